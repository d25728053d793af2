"""The config every method declares: its name, one line for `--help`, the records it owns,
where its implementation lives, and its options with documented defaults.

Plain pydantic, no torch: the CLI lists the methods and their defaults without importing
torch. The implementation (a `Method` subclass, see `methods/base.py`) is imported on use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mposurgeon.methods.records import ModuleRecord


class MethodConfig(BaseModel):
    """Options of one method, each with its default. Subclasses set the class variables, give
    `lr` the default measured for them (benchmarks/RESULTS.md) and add their own options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The name users pass to `train --method`, and records carry in `method`.
    name: ClassVar[str]
    #: One line for `train --help` and the README.
    summary: ClassVar[str]
    #: `module:Class` of the method's `Method` subclass, imported when it is used.
    implementation: ClassVar[str]
    #: Whether `train --method` selects it (`mpo` only owns the cores decompose writes).
    trains: ClassVar[bool] = True
    #: Whether OPF's dynamic selection (`train --dynamic`, or a `select` artifact of several
    #: rounds) decomposes more matrices for it during training.
    selects_dynamically: ClassVar[bool] = False
    #: Whether `train --squeeze-to` may cut the bonds of its MPO cores during training (its
    #: trained records are read from the live cores).
    squeezes: ClassVar[bool] = False
    #: Whether its models can generate (`--generate`): virtual tokens cannot, without a cache.
    generates: ClassVar[bool] = True
    #: The class of the module records this method owns (None: it writes none of its own).
    record: ClassVar[type[ModuleRecord] | None] = None

    lr: float = Field(2e-5, gt=0, allow_inf_nan=False, description="peak learning rate")

    @classmethod
    def default(cls, option: str) -> Any:
        """The default of `option` (e.g. "lr")."""
        return cls.model_fields[option].default

    @classmethod
    def options(cls) -> list[str]:
        """The names of the method's options."""
        return list(cls.model_fields)


def comma_list(cls: type, value: object) -> object:
    """A pydantic `mode="before"` validator: "a, b" -> ["a", "b"] (lists pass unchanged)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def names_regex(names: Sequence[str]) -> str:
    """A regex matching whole module names that end with one of `names` (PEFT's matching)."""
    if not names:
        return "$^"  # matches nothing
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"


def _names_as_regex(value: object) -> object:
    """PEFT's list form of `target_modules` (module names, each matching a module whose whole
    name is it or ends with "." + it) as the equivalent regex; a regex passes unchanged."""
    if isinstance(value, list | tuple | set | frozenset):
        names = sorted(value) if isinstance(value, set | frozenset) else list(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("give module names (non-empty strings), or a regex")
        return names_regex(names)
    return value


#: A regex of whole module names, or (PEFT's habit) a list of module names matched by suffix.
ModuleRegex = Annotated[str | None, BeforeValidator(_names_as_regex)]


def _groups_list(value: object) -> object:
    """ "FFN_1, attention" -> ["FFN_1", "attention"] (lists pass unchanged)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


#: Weight groups (`FFN_1`, `FFN_2`, `attention`, ...), as a list or a comma-separated string.
WeightGroups = Annotated[list[str] | None, BeforeValidator(_groups_list)]
