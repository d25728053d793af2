"""`lora`: the config (rank, alpha, dropout, which matrices)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from mposurgeon.methods.config import MethodConfig, ModuleRegex, comma_list
from mposurgeon.methods.lora.record import LoraRecord

#: The rank without --lora-r or --budget.
DEFAULT_RANK = 8


class LoraConfig(MethodConfig):
    """LoRA through `peft`: each targeted matrix W gets W + (alpha / r) B A with A (r, in),
    B (out, r); A starts random, B at zero (the model starts as the base model); only A, B and
    the task head train. Targets: `layers` groups or a `target_modules` regex, else PEFT's
    default for the model type (query and value for BERT). `budget` picks the rank: the
    largest whose trainable parameters (r x the sum of in + out over the targets) fit.
    Default rate measured on man-sections (r 8 on query and value, 3 epochs): 0.818 at 2e-3,
    0.639 at 5e-4 (higher rates not measured yet)."""

    name: ClassVar[str] = "lora"
    summary: ClassVar[str] = (
        "LoRA (peft): low-rank updates of the targeted matrices and the head train"
    )
    implementation: ClassVar[str] = "mposurgeon.methods.lora.method:LoraMethod"
    record: ClassVar[type[LoraRecord]] = LoraRecord

    lr: float = Field(2e-3, gt=0, allow_inf_nan=False, description="peak learning rate")
    lora_r: int | None = Field(None, ge=1, description="rank of the update (8; see budget)")
    lora_alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="scale alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    layers: list[str] | None = Field(None, description="weight groups, e.g. attention,FFN_1")
    target_modules: ModuleRegex = Field(None, description="regex, full match on module names")
    budget: int | None = Field(
        None, ge=1, description="the largest rank whose parameters do not exceed it"
    )

    @model_validator(mode="after")
    def _rank_or_budget(self) -> LoraConfig:
        if self.lora_r is not None and self.budget is not None:
            raise ValueError("give --lora-r or --budget, not both: the budget sets the rank")
        return self

    def rank(self, per_rank: int) -> int:
        """The rank to train: `lora_r` (default 8), or the largest whose `per_rank`
        parameters per unit of rank fit in `budget`."""
        if self.budget is None:
            return self.lora_r or DEFAULT_RANK
        return self.budget // per_rank

    _split = field_validator("layers", mode="before")(comma_list)
