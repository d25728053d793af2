"""Configs of the MPO family: `mpo` (the cores decompose and truncate write; not a training
method) and the base of the methods that train MPO cores."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.mpo.record import MPORecord


class MPOConfig(MethodConfig):
    """Weight matrices held as MPO cores (`M.mpo.core.k`): merged by contracting the cores."""

    name: ClassVar[str] = "mpo"
    summary: ClassVar[str] = "MPO cores written by decompose and truncate (not trained)"
    implementation: ClassVar[str] = "mposurgeon.methods.mpo.method:MPOMethod"
    trains: ClassVar[bool] = False
    record: ClassVar[type[MPORecord]] = MPORecord


class MPOTrainingConfig(MethodConfig):
    """Options of every method that trains MPO cores (the modules stay `mpo` records)."""

    squeezes: ClassVar[bool] = True

    mpo_lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="learning rate of MPO cores (default lr)"
    )
