"""`mpoe` (Gao et al., 2022): the training options of an MPO mixture of experts."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.mpoe.record import MPOERecord


class MPOEConfig(MethodConfig):
    """Trains an MPOE artifact (`mposurgeon moe`) whole, as the paper fine-tunes: the routers,
    every expert's auxiliary cores, the shared central core, whose gradient is dropped each
    step with probability `grad_mask_p` (the paper's gradient mask: the central core sees
    every expert's tokens), and the model's other weights and head; the loss adds the Switch
    load-balancing loss times `balance_coef`. Default rate measured on man-sections (MiniLM,
    4 experts, 3 epochs, seed 0; benchmarks/bench_mpoe.py): 0.874 at 5e-5, 0.894 at 1e-4,
    0.883 at 2e-4."""

    name: ClassVar[str] = "mpoe"
    summary: ClassVar[str] = (
        "MPO mixture of experts (from `moe`): routers, expert cores, the shared central "
        "core (gradient mask) and the other weights train"
    )
    implementation: ClassVar[str] = "mposurgeon.methods.mpoe.method:MPOEMethod"
    record: ClassVar[type[MPOERecord]] = MPOERecord

    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    grad_mask_p: float = Field(
        0.0, ge=0, le=1, description="probability of dropping the central core's gradient"
    )
    balance_coef: float = Field(
        0.01, ge=0, allow_inf_nan=False, description="weight of the load-balancing loss"
    )
