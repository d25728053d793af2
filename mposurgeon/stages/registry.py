"""The stages: the one list the public API, recipes and the CLI derive theirs from.

Each entry names its stage (the command and the recipe key; the public function too, except for
`eval`, whose function is `evaluate`: a public `mposurgeon.eval` would shadow the builtin under
`from mposurgeon import *`), the module holding the function and its options class, the CLI
module holding its command `<name>_command`, and whether the stage writes an artifact (`inspect`
and `eval` write nothing: in a recipe they read the output of the last stage before them and
the next stage reads that output too). Only names are kept here, imported when used, so that
reading the list (as `mposurgeon --help` does) does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage: `module.<function_name>(input, options, progress=...)`, configured by
    `module.<options>` (None: a stage that takes no options class, i.e. `inspect`)."""

    name: str
    module: str
    options: str | None
    command_module: str
    writes: bool = True  # whether it writes an artifact (a recipe chains those)
    api_name: str | None = None  # the public function's name when it is not `name`

    @property
    def command(self) -> str:
        """The name of the CLI command function in `command_module`."""
        return f"{self.name}_command"

    @property
    def function_name(self) -> str:
        """The name of the stage function in `module` and in the public API."""
        return self.api_name or self.name

    def function(self) -> Any:
        """The stage function (imports its module)."""
        return getattr(import_module(self.module), self.function_name)

    def options_class(self) -> Any:
        """The stage's options class (imports its module)."""
        if self.options is None:
            raise TypeError(f"stage {self.name!r} takes no options class")
        return getattr(import_module(self.module), self.options)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="decompose",
        module="mposurgeon.stages.decompose",
        options="DecomposeOptions",
        command_module="mposurgeon.cli.decompose",
    ),
    Stage(
        name="truncate",
        module="mposurgeon.stages.truncate",
        options="TruncateOptions",
        command_module="mposurgeon.cli.truncate",
    ),
    Stage(
        name="prune",
        module="mposurgeon.stages.prune",
        options="PruneOptions",
        command_module="mposurgeon.cli.prune",
    ),
    Stage(
        name="moe",
        module="mposurgeon.stages.moe",
        options="MoeOptions",
        command_module="mposurgeon.cli.moe",
    ),
    Stage(
        name="select",
        module="mposurgeon.stages.select",
        options="SelectOptions",
        command_module="mposurgeon.cli.select",
    ),
    Stage(
        name="train",
        module="mposurgeon.stages.train",
        options="TrainOptions",
        command_module="mposurgeon.cli.train",
    ),
    Stage(
        name="eval",
        module="mposurgeon.stages.eval",
        options="EvalOptions",
        command_module="mposurgeon.cli.eval",
        writes=False,
        api_name="evaluate",
    ),
    Stage(
        name="merge",
        module="mposurgeon.stages.merge",
        options="MergeOptions",
        command_module="mposurgeon.cli.merge",
    ),
    Stage(
        name="inspect",
        module="mposurgeon.stages.inspect",
        options=None,
        command_module="mposurgeon.cli.inspect",
        writes=False,
    ),
)

#: The stages by name.
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
