"""`overparam` (OPF): train every MPO core and every other parameter."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.mpo.config import MPOTrainingConfig


class OverparamConfig(MPOTrainingConfig):
    """All cores (central included) and the rest train; a `select` artifact's chosen matrices
    are decomposed losslessly in place first. Default rate measured on man-sections: 0.889 at
    1e-4 (0.789 at 2e-5, 0.886 at 2e-4, 0.408 at 5e-4)."""

    name: ClassVar[str] = "overparam"
    summary: ClassVar[str] = "OPF: every MPO core and every other parameter trains"
    implementation: ClassVar[str] = "mposurgeon.methods.overparam.method:OverparamMethod"
    selects_dynamically: ClassVar[bool] = True

    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    num_cores: int = Field(5, ge=2, le=64, description="cores of matrices decomposed in place")
