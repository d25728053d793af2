"""Module records: what the manifest says about one transformed weight matrix.

Every record names the method that owns the module's state (`method`), and that method's
record class adds what it needs (an MPO record: modes, bonds, padding, ...). The manifest
picks the class by `method` through the registry. Plain data, no torch: reading a manifest
stays cheap.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, NonNegativeInt, PositiveInt
from pydantic_core import PydanticCustomError

from mposurgeon.models.orientation import Kind, stored_shape

_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _module_name(value: str) -> str:
    """A dotted module path like `encoder.layer.0.output.dense`: no `/`, no empty parts."""
    if not _MODULE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a dotted module name (letters, digits, _ and - between dots)"
        )
    return value


#: A module (or tensor) name: a dotted path, never a file path.
ModuleName = Annotated[str, AfterValidator(_module_name)]

#: Float dtypes a module's original weight may have (what merge casts back to).
FloatDtype = Literal["float16", "bfloat16", "float32", "float64"]


def field_error(field: str, text: str) -> PydanticCustomError:
    """A validation error about `field` (relative to the record being validated)."""
    return PydanticCustomError("manifest_field", "{field}: {text}", {"field": field, "text": text})


class ModuleRecord(BaseModel):
    """One transformed weight matrix of the original checkpoint, whatever the method.

    `shape` is the weight as stored in the original file (Conv1D stores (in, out));
    `params` counts the elements of the method's tensors for the module, `dense_params` those
    of the original weight.
    """

    # Newer minor versions may add fields: keep them instead of failing, but validate known ones.
    model_config = ConfigDict(extra="allow")

    name: ModuleName
    method: str
    kind: Kind
    weight_key: ModuleName
    shape: list[PositiveInt]
    dtype: FloatDtype
    params: NonNegativeInt
    dense_params: NonNegativeInt
    tied_keys: list[ModuleName] = []

    #: Whether the module's own weight stays a plain tensor of the files beside the method's
    #: tensors (an adapter follows the module) rather than being replaced (MPO cores) or owned.
    keeps_weight: ClassVar[bool] = False

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors of this module's state in the artifact's files, with their shapes."""
        return {}

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        """The module a tensor named `key` belongs to if the name is one of this record
        class's (e.g. `M.mpo.core.2` -> `M`), else None."""
        return None

    def check_weight(self, out_dim: int, in_dim: int) -> list[tuple[str, str]]:
        """Problems (field, text) of `shape` and `weight_key` against (out_dim, in_dim)."""
        problems: list[tuple[str, str]] = []
        stored = list(stored_shape(out_dim, in_dim, self.kind))
        if self.shape != stored:
            order = "[{}, {}]".format(*stored_shape("out_dim", "in_dim", self.kind))
            problems.append(
                ("shape", f"{self.shape} is not {order} = {stored} of a {self.kind} weight")
            )
        if self.weight_key != f"{self.name}.weight":
            problems.append(("weight_key", f"{self.weight_key!r} is not {self.name + '.weight'!r}"))
        return problems


def raise_problems(problems: list[tuple[str, str]]) -> None:
    """One validation error carrying every problem, the first one's field leading."""
    if problems:
        field, first = problems[0]
        more = "".join(f"; {f} {text}" for f, text in problems[1:])
        raise field_error(field, first + more)
