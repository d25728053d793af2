"""`prompt-tuning` (Lester et al., 2021): the config (prompt length, its initialization)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.prompt_tuning.record import PromptRecord

#: The prompt length without --num-virtual-tokens or --budget.
DEFAULT_TOKENS = 20


class PromptTuningConfig(MethodConfig):
    """`num_virtual_tokens` trained vectors prepended to the input embeddings of every row
    (PEFT's prompt tuning, same forward: the attention mask and token types grow by the
    prompt, position ids are dropped, a causal LM's labels get -100 there); only the prompt
    and the task head train. `prompt_init` "vocab" starts it from the embeddings of random
    vocabulary tokens (PEFT's SAMPLE_VOCAB, seeded by the run's seed), "random" from N(0, 1)
    (PEFT's RANDOM). `budget` picks the length: the largest whose hidden x length fits.
    Default rate measured on man-sections (20 virtual tokens, 3 epochs): 0.754 at 3e-2, 0.736
    at 3e-1."""

    name: ClassVar[str] = "prompt-tuning"
    summary: ClassVar[str] = "virtual tokens prepended to the input, and the head train"
    implementation: ClassVar[str] = "mposurgeon.methods.prompt_tuning.method:PromptTuningMethod"
    record: ClassVar[type[PromptRecord]] = PromptRecord
    generates: ClassVar[bool] = False

    lr: float = Field(3e-2, gt=0, allow_inf_nan=False, description="peak learning rate")
    num_virtual_tokens: int | None = Field(
        None, ge=1, le=4096, description="prompt length (20; see budget)"
    )
    prompt_init: Literal["vocab", "random"] = Field(
        "vocab", description="start from random vocabulary embeddings, or N(0, 1)"
    )
    budget: int | None = Field(None, ge=1, description="the largest length whose vectors fit")

    @model_validator(mode="after")
    def _length_or_budget(self) -> PromptTuningConfig:
        if self.num_virtual_tokens is not None and self.budget is not None:
            raise ValueError(
                "give --num-virtual-tokens or --budget, not both: the budget sets the length"
            )
        return self

    def length(self, hidden: int) -> int:
        """The prompt length: `num_virtual_tokens` (20), or the most `hidden`-wide vectors
        that fit in `budget`."""
        if self.budget is None:
            return self.num_virtual_tokens or DEFAULT_TOKENS
        return self.budget // hidden
