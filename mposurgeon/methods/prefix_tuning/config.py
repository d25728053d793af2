"""`prefix-tuning` (Li and Liang, 2021): the config (prefix length)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.prefix_tuning.record import PrefixRecord

#: The prefix length without --num-virtual-tokens or --budget.
DEFAULT_TOKENS = 20


class PrefixTuningConfig(MethodConfig):
    """`num_virtual_tokens` trained keys and values prepended in every attention module (the
    prefix, PEFT's prefix tuning without its reparametrization), seen by every input position
    and never masked; positions of the input are unchanged. Only the prefix and the task head
    train. `prefix_init` "vocab" starts each module's prefix from the keys and values it
    computes for random vocabulary tokens (seeded by the run's seed): the model starts as if
    they were input; "random" from N(0, 1), PEFT's start. Works on every model whose attention
    goes through `transformers`' attention interface (BERT, GPT-2, Llama, BART, T5, ...; not
    BLOOM), where PEFT needs a model that takes a key-value cache (not BERT in transformers
    5). ALBERT shares one attention module across its layers: they share its prefix too.
    `budget` picks the length: the largest whose keys and values fit. Default rate measured
    on man-sections (20 virtual tokens, 3 epochs): 0.868 at 1e-1, 0.771 at 1e-2."""

    name: ClassVar[str] = "prefix-tuning"
    summary: ClassVar[str] = (
        "trained keys and values prepended in every attention layer, and the head train"
    )
    implementation: ClassVar[str] = "mposurgeon.methods.prefix_tuning.method:PrefixTuningMethod"
    record: ClassVar[type[PrefixRecord]] = PrefixRecord

    lr: float = Field(1e-1, gt=0, allow_inf_nan=False, description="peak learning rate")
    num_virtual_tokens: int | None = Field(
        None, ge=1, le=4096, description="prefix length (20; see budget)"
    )
    prefix_init: Literal["vocab", "random"] = Field(
        "vocab", description="start from the keys and values of random tokens, or N(0, 1)"
    )
    budget: int | None = Field(None, ge=1, description="the largest length whose prefix fits")

    @model_validator(mode="after")
    def _length_or_budget(self) -> PrefixTuningConfig:
        if self.num_virtual_tokens is not None and self.budget is not None:
            raise ValueError(
                "give --num-virtual-tokens or --budget, not both: the budget sets the length"
            )
        return self

    def length(self, per_token: int) -> int:
        """The prefix length: `num_virtual_tokens` (20), or the most tokens whose
        `per_token` parameters each fit in `budget`."""
        if self.budget is None:
            return self.num_virtual_tokens or DEFAULT_TOKENS
        return self.budget // per_token
