"""The record of a matrix with APET-trained elements.

Files hold `M.weight` (the base weight, unchanged), `M.apet.index` (n,) int64, the flat
positions in `M.weight` as stored (GPT-2 Conv1D: (in, out)), ascending, and `M.apet.values`
(n,), the trained deltas: the module's weight is `M.weight` with `values` added at `index`.
"""

from __future__ import annotations

import re

from pydantic import PositiveInt

from mposurgeon.methods.records import ModuleRecord

#: An APET tensor's name: `M.apet.index` or `M.apet.values`.
APET_KEY = re.compile(r"(?P<module>.+)\.apet\.(?:index|values)")


class ApetRecord(ModuleRecord):
    """A matrix of which `elements` entries train (the same count in `params`)."""

    elements: PositiveInt

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            self.weight_key: tuple(self.shape),
            f"{self.name}.apet.index": (self.elements,),
            f"{self.name}.apet.values": (self.elements,),
        }

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = APET_KEY.fullmatch(key)
        return match["module"] if match else None
