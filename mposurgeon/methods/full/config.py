"""`full`: dense fine-tuning of every parameter, the baseline every method is compared with."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.mpo.config import MPOTrainingConfig


class FullConfig(MPOTrainingConfig):
    """Every parameter trains, MPO cores included. Default rate measured on man-sections
    (benchmarks/RESULTS.md): 0.918 at 2e-4 (0.771 at the usual BERT rate 2e-5, 0.897 at
    5e-5, 0.906 at 1e-4); the reference the other methods are compared with."""

    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "dense fine-tuning: every parameter trains (the baseline)"
    implementation: ClassVar[str] = "mposurgeon.methods.full.method:FullMethod"

    lr: float = Field(2e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
