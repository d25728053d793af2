"""`full`: dense fine-tuning of every parameter, the baseline every method is compared with."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.mpo.config import MPOTrainingConfig


class FullConfig(MPOTrainingConfig):
    """Every parameter trains, MPO cores included (the usual BERT learning rate, 0.771 on
    man-sections: the reference of benchmarks/RESULTS.md)."""

    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "dense fine-tuning: every parameter trains (the baseline)"
    implementation: ClassVar[str] = "mposurgeon.methods.full.method:FullMethod"

    lr: float = Field(2e-5, gt=0, allow_inf_nan=False, description="peak learning rate")
