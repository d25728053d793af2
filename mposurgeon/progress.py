"""The progress callback every stage and the training loop report through.

`progress(description, done, total)` is called as work advances; the CLI draws it as a bar,
the Python API may pass any callable (or None).
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[str, int, int], None]
