"""The record of a DSEE module: its base weight, its low-rank factors and its sparse update.

Files hold `M.weight` (the base weight, unchanged: `from_pretrained` loads it),
`M.lora_A.weight` (r, in), `M.lora_B.weight` (out, r), `M.dsee.index` (N,) int64, the flat
positions of the support in `M.weight` as stored (GPT-2 Conv1D: (in, out)), ascending, and
`M.dsee.values` (N,), the sparse update there. The module's weight is
`W + (alpha / r) B A` (transposed to match for Conv1D) with `values` added at `index`.
"""

from __future__ import annotations

import re

from pydantic import PositiveFloat, PositiveInt

from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.orientation import matrix_dims

#: A DSEE tensor's name: `M.lora_A.weight`, `M.lora_B.weight`, `M.dsee.index`, `M.dsee.values`.
DSEE_KEY = re.compile(r"(?P<module>.+)\.(?:lora_[AB]\.weight|dsee\.(?:index|values))")


class DseeRecord(ModuleRecord):
    """A matrix with a LoRA update of rank `r` scaled by `alpha / r`, and a sparse update of
    `sparse_size` entries whose support `sparse_init` chose."""

    r: PositiveInt
    alpha: PositiveFloat
    sparse_size: PositiveInt
    sparse_init: str

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        out_dim, in_dim = matrix_dims(tuple(self.shape), self.kind)
        return {
            self.weight_key: tuple(self.shape),
            f"{self.name}.lora_A.weight": (self.r, in_dim),
            f"{self.name}.lora_B.weight": (out_dim, self.r),
            f"{self.name}.dsee.index": (self.sparse_size,),
            f"{self.name}.dsee.values": (self.sparse_size,),
        }

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = DSEE_KEY.fullmatch(key)
        return match["module"] if match else None
