"""`dsee` (Dually Sparsity-Embedded Efficient tuning, Chen et al. 2023): the config."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from mposurgeon.methods.config import MethodConfig, ModuleRegex, comma_list
from mposurgeon.methods.dsee.record import DseeRecord

#: How the support of the sparse update is chosen (see `methods/dsee/support.py`).
SparseInit = Literal["godec", "magnitude", "random"]

#: DSEE adapts by default the query and value projections of attention (the paper's; a fused
#: projection such as GPT-2's c_attn counts as both).
DEFAULT_LAYERS = ["attention"]
DEFAULT_PROJECTIONS = ("q", "v", "qkv")


class DseeConfig(MethodConfig):
    """Each targeted matrix W gets W + (alpha / r) B A + S: a LoRA update of rank `lora_r`
    (A (r, in) random, B (out, r) zero) and a sparse update S whose support holds
    `sparse_size` entries, fixed before training and chosen by `sparse_init` (`godec`: the
    largest entries of the sparse part of a low-rank + sparse split of W; `magnitude`: the
    largest |W|; `random`: seeded by the run's seed). S's values start at zero, so the model
    starts as the base model; A, B, S's values and the task head train. Per matrix:
    r x (in + out) + sparse_size parameters. Targets: `layers` groups or a `target_modules`
    regex (default: the query and value projections, as the paper). Defaults are the paper's
    (r 16, alpha 32, 64 entries). Default rate measured on man-sections (3 epochs): 0.865 at
    2e-3; 1e-2 diverges (0.214)."""

    name: ClassVar[str] = "dsee"
    summary: ClassVar[str] = (
        "DSEE: a LoRA update plus --sparse-size sparse entries per targeted matrix train"
    )
    implementation: ClassVar[str] = "mposurgeon.methods.dsee.method:DseeMethod"
    record: ClassVar[type[DseeRecord]] = DseeRecord

    lr: float = Field(2e-3, gt=0, allow_inf_nan=False, description="peak learning rate")
    lora_r: int = Field(16, ge=1, description="rank of the low-rank update")
    lora_alpha: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="scale alpha / r (default 2 x r)"
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    sparse_size: int = Field(64, ge=1, description="entries of the sparse update per matrix")
    sparse_init: SparseInit = Field("godec", description="how the sparse support is chosen")
    layers: list[str] | None = Field(None, description="weight groups, e.g. attention,FFN_1")
    target_modules: ModuleRegex = Field(None, description="regex, full match on module names")

    @property
    def alpha(self) -> float:
        """`lora_alpha`, or 2 x r (the paper's 32 at rank 16)."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r

    _split = field_validator("layers", mode="before")(comma_list)
