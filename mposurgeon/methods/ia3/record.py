"""The record of an IA3 module: its base weight (and bias) and its scaling vector.

Files hold `M.weight` (the base weight, unchanged: `from_pretrained` loads it), `M.ia3_l` (PEFT's
name without the adapter name) and, for a module that scales its output and has a bias, that
bias `M.bias`. An output-scaled module (keys, values) computes (W x + b) * l with l of shape
(out, 1): its dense weight is l * W and its dense bias l * b. An input-scaled one (PEFT's
"feedforward" modules, the FFN output projection) computes W (x * l) + b with l of shape
(1, in): its dense weight is W * l, its bias unchanged. The shapes refer to the (out, in) matrix
whatever the layer's storage (GPT-2's Conv1D stores W as (in, out)), as PEFT stores them.
"""

from __future__ import annotations

import re

from mposurgeon.methods.records import ModuleName, ModuleRecord
from mposurgeon.models.orientation import matrix_dims

#: An IA3 scaling vector's tensor name: `M.ia3_l`.
SCALING_KEY = re.compile(r"(?P<module>.+)\.ia3_l")


class Ia3Record(ModuleRecord):
    """A matrix whose input (`feedforward`) or output is scaled by a learned vector;
    `bias_key` names the bias an output scaling also scales (None: none is scaled)."""

    feedforward: bool
    bias_key: ModuleName | None = None

    def scaling_shape(self) -> tuple[int, int]:
        """The shape of `M.ia3_l`: (out, 1), or (1, in) for an input scaling."""
        out_dim, in_dim = matrix_dims(tuple(self.shape), self.kind)
        return (1, in_dim) if self.feedforward else (out_dim, 1)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        out_dim, _ = matrix_dims(tuple(self.shape), self.kind)
        shapes: dict[str, tuple[int, ...]] = {
            self.weight_key: tuple(self.shape),
            f"{self.name}.ia3_l": self.scaling_shape(),
        }
        if self.bias_key is not None:
            shapes[self.bias_key] = (out_dim,)
        return shapes

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = SCALING_KEY.fullmatch(key)
        return match["module"] if match else None
