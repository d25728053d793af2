"""`lightweight` (MPOP): train the auxiliary MPO cores, keep the central cores frozen."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.mpo.config import MPOTrainingConfig


class LightweightConfig(MPOTrainingConfig):
    """Auxiliary cores, biases, norms and the task head train. Default rate measured on
    man-sections: 0.903 at 5e-4 (0.595 at 2e-5, 0.886 at 3e-4, 0.765 at 1e-3)."""

    name: ClassVar[str] = "lightweight"
    summary: ClassVar[str] = (
        "MPOP: auxiliary MPO cores, biases, norms and head train; central cores frozen"
    )
    implementation: ClassVar[str] = "mposurgeon.methods.lightweight.method:LightweightMethod"

    lr: float = Field(5e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
