"""mposurgeon: surgery on Hugging Face transformer checkpoints with Matrix Product Operators.

The public Python API mirrors the CLI: each stage takes the same options as its command.

    >>> import mposurgeon
    >>> result = mposurgeon.decompose("path/to/model", layers=["FFN_1", "attention"])
    >>> merged = mposurgeon.merge(result.output, verify=True)
    >>> report = mposurgeon.inspect(merged.output)

Names are imported lazily, so `import mposurgeon` (and `mposurgeon --help`) stays fast and
does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mposurgeon._version import __version__

if TYPE_CHECKING:
    from mposurgeon.stages.decompose import DecomposeOptions, decompose
    from mposurgeon.stages.inspect import inspect
    from mposurgeon.stages.load import load_model
    from mposurgeon.stages.merge import MergeOptions, merge
    from mposurgeon.stages.recipe import run_recipe
    from mposurgeon.stages.select import SelectOptions, select
    from mposurgeon.stages.train import TrainOptions, train
    from mposurgeon.stages.truncate import TruncateOptions, truncate

_LAZY = {
    "decompose": "mposurgeon.stages.decompose",
    "DecomposeOptions": "mposurgeon.stages.decompose",
    "merge": "mposurgeon.stages.merge",
    "MergeOptions": "mposurgeon.stages.merge",
    "inspect": "mposurgeon.stages.inspect",
    "load_model": "mposurgeon.stages.load",
    "select": "mposurgeon.stages.select",
    "SelectOptions": "mposurgeon.stages.select",
    "train": "mposurgeon.stages.train",
    "TrainOptions": "mposurgeon.stages.train",
    "truncate": "mposurgeon.stages.truncate",
    "TruncateOptions": "mposurgeon.stages.truncate",
    "run_recipe": "mposurgeon.stages.recipe",
}

__all__ = [
    "DecomposeOptions",
    "MergeOptions",
    "SelectOptions",
    "TrainOptions",
    "TruncateOptions",
    "__version__",
    "decompose",
    "inspect",
    "load_model",
    "merge",
    "run_recipe",
    "select",
    "train",
    "truncate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mposurgeon' has no attribute {name!r}")
