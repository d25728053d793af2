"""mposurgeon: surgery on Hugging Face transformer checkpoints with Matrix Product Operators.

The public Python API mirrors the CLI: each stage takes the same options as its command.

    >>> import mposurgeon
    >>> result = mposurgeon.decompose("path/to/model", layers=["FFN_1", "attention"])
    >>> merged = mposurgeon.merge(result.output, verify=True)
    >>> report = mposurgeon.inspect(merged.output)
    >>> scores = mposurgeon.evaluate(merged.output, data="eval.jsonl").metrics

Names are imported lazily, so `import mposurgeon` (and `mposurgeon --help`) stays fast and
does not import torch. The stages and their options classes come from the one list of stages,
`mposurgeon.stages.registry.STAGES`; the imports for type checkers below mirror it (a test
keeps them in step).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mposurgeon._version import __version__
from mposurgeon.stages.registry import STAGES as _STAGES

if TYPE_CHECKING:  # what `_LAZY` names, for type checkers and editors
    from mposurgeon.artifact.load import load_model as load_model
    from mposurgeon.prepared import merge_and_unload as merge_and_unload
    from mposurgeon.prepared import prepare as prepare
    from mposurgeon.prepared import save_artifact as save_artifact
    from mposurgeon.stages.decompose import DecomposeOptions as DecomposeOptions
    from mposurgeon.stages.decompose import decompose as decompose
    from mposurgeon.stages.eval import EvalOptions as EvalOptions
    from mposurgeon.stages.eval import evaluate as evaluate
    from mposurgeon.stages.export_peft import ExportPeftOptions as ExportPeftOptions
    from mposurgeon.stages.export_peft import export_peft as export_peft
    from mposurgeon.stages.inspect import inspect as inspect
    from mposurgeon.stages.merge import MergeOptions as MergeOptions
    from mposurgeon.stages.merge import merge as merge
    from mposurgeon.stages.moe import MoeOptions as MoeOptions
    from mposurgeon.stages.moe import moe as moe
    from mposurgeon.stages.prune import PruneOptions as PruneOptions
    from mposurgeon.stages.prune import prune as prune
    from mposurgeon.stages.recipe import run_recipe as run_recipe
    from mposurgeon.stages.select import SelectOptions as SelectOptions
    from mposurgeon.stages.select import select as select
    from mposurgeon.stages.train import TrainOptions as TrainOptions
    from mposurgeon.stages.train import train as train
    from mposurgeon.stages.truncate import TruncateOptions as TruncateOptions
    from mposurgeon.stages.truncate import truncate as truncate

#: public name -> the module that defines it: every stage and its options class, and the rest
#: of the API (the model with MPO layers in place, the recipe runner).
_LAZY: dict[str, str] = {
    **{stage.function_name: stage.module for stage in _STAGES},
    **{stage.options: stage.module for stage in _STAGES if stage.options is not None},
    "load_model": "mposurgeon.artifact.load",
    "export_peft": "mposurgeon.stages.export_peft",
    "ExportPeftOptions": "mposurgeon.stages.export_peft",
    "run_recipe": "mposurgeon.stages.recipe",
    "prepare": "mposurgeon.prepared",
    "save_artifact": "mposurgeon.prepared",
    "merge_and_unload": "mposurgeon.prepared",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mposurgeon' has no attribute {name!r}")
