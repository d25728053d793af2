"""The record of a module followed by a bottleneck adapter.

Files hold the module's own tensors unchanged and `M.adapter.down.weight` (size, d),
`M.adapter.down.bias` (size,), `M.adapter.up.weight` (d, size), `M.adapter.up.bias` (d,), where
d is the module's output width: the module computes y + up(gelu(down(y))) from its output y.
No dense weight holds that: merge refuses it (load_model runs it).
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import PositiveInt

from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.orientation import matrix_dims

#: An adapter tensor's name.
ADAPTER_KEY = re.compile(r"(?P<module>.+)\.adapter\.(?:down|up)\.(?:weight|bias)")


class AdapterRecord(ModuleRecord):
    """A module with a bottleneck adapter of `size` hidden units on its output."""

    size: PositiveInt
    keeps_weight: ClassVar[bool] = True

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        out_dim, _ = matrix_dims(tuple(self.shape), self.kind)
        return {
            f"{self.name}.adapter.down.weight": (self.size, out_dim),
            f"{self.name}.adapter.down.bias": (self.size,),
            f"{self.name}.adapter.up.weight": (out_dim, self.size),
            f"{self.name}.adapter.up.bias": (out_dim,),
        }

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = ADAPTER_KEY.fullmatch(key)
        return match["module"] if match else None
