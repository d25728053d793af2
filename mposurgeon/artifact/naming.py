"""Tensor names inside an artifact: the MPO cores of module `M` are `M.mpo.core.k`."""

from __future__ import annotations

import re

CORE_KEY = re.compile(r"(?P<module>.+)\.mpo\.core\.(?P<index>\d+)")


def core_key(module: str, index: int) -> str:
    """The tensor name of core `index` of the MPO of module `module`."""
    return f"{module}.mpo.core.{index}"
