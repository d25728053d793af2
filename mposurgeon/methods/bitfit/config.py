"""`bitfit` (Ben Zaken et al., 2022): the config."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.config import MethodConfig


class BitFitConfig(MethodConfig):
    """Every bias term trains, and the task head; every weight stays as loaded. Nothing to
    merge: the trained biases are ordinary tensors of the checkpoint. Default rate measured on
    man-sections (3 epochs): 0.821 at 1e-2, 0.683 at 1e-3 (higher rates not measured yet)."""

    name: ClassVar[str] = "bitfit"
    summary: ClassVar[str] = "BitFit: only the biases and the task head train"
    implementation: ClassVar[str] = "mposurgeon.methods.bitfit.method:BitFitMethod"

    lr: float = Field(1e-2, gt=0, allow_inf_nan=False, description="peak learning rate")
