"""The stages: the one list the public API, recipes and the CLI derive theirs from.

Each entry names its stage (the function, the command and the recipe key share that name), the
module holding the function and its options class, and the CLI module holding its command
`<name>_command`. Only names are kept here, imported when used, so that reading the list (as
`mposurgeon --help` does) does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage: `module.<name>(input, options, progress=...)`, configured by `module.<options>`
    (None: a stage that writes nothing and takes no options class, i.e. `inspect`)."""

    name: str
    module: str
    options: str | None
    command_module: str

    @property
    def command(self) -> str:
        """The name of the CLI command function in `command_module`."""
        return f"{self.name}_command"

    def function(self) -> Any:
        """The stage function (imports its module)."""
        return getattr(import_module(self.module), self.name)

    def options_class(self) -> Any:
        """The stage's options class (imports its module); only for stages that write."""
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
    ),
)

#: The stages by name.
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
