"""The record of a LoRA module: its base weight and its low-rank factors in the artifact.

Files hold `M.weight` (the base weight, unchanged: `from_pretrained` loads it), `M.lora_A.weight`
(r, in) and `M.lora_B.weight` (out, r), PEFT's names without the adapter name. The module's
weight is `W + (alpha / r) B A` (for GPT-2's Conv1D, which stores W as (in, out), the update
is transposed to match).
"""

from __future__ import annotations

import re

from pydantic import PositiveFloat, PositiveInt

from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.orientation import matrix_dims

#: A LoRA factor's tensor name: `M.lora_A.weight` or `M.lora_B.weight`.
FACTOR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")


class LoraRecord(ModuleRecord):
    """A matrix with a LoRA update of rank `r` scaled by `alpha / r`."""

    r: PositiveInt
    alpha: PositiveFloat

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        out_dim, in_dim = matrix_dims(tuple(self.shape), self.kind)
        return {
            self.weight_key: tuple(self.shape),
            f"{self.name}.lora_A.weight": (self.r, in_dim),
            f"{self.name}.lora_B.weight": (out_dim, self.r),
        }

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = FACTOR_KEY.fullmatch(key)
        return match["module"] if match else None
