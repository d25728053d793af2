"""`adapter` (Houlsby et al., 2019): the config."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from mposurgeon.methods.adapter.record import AdapterRecord
from mposurgeon.methods.config import MethodConfig

#: The bottleneck width without --adapter-size or --budget.
DEFAULT_SIZE = 16


class AdapterConfig(MethodConfig):
    """A bottleneck (down to `adapter_size`, GELU, up) after each attention output projection
    and each FFN output projection, added to their output; its up projection starts at zero,
    so the model starts as the base model. Only the adapters and the task head train. `budget`
    picks the size: the largest whose parameters fit. Default rate measured on man-sections (size
    16, 3 epochs): 0.848 at 3e-3, 0.701 at 1e-3."""

    name: ClassVar[str] = "adapter"
    summary: ClassVar[str] = "Houlsby adapters after attention and FFN outputs, and the head train"
    implementation: ClassVar[str] = "mposurgeon.methods.adapter.method:AdapterMethod"
    record: ClassVar[type[AdapterRecord]] = AdapterRecord

    lr: float = Field(3e-3, gt=0, allow_inf_nan=False, description="peak learning rate")
    adapter_size: int | None = Field(None, ge=1, description="bottleneck width (16)")
    budget: int | None = Field(None, ge=1, description="the largest size whose parameters fit")

    @model_validator(mode="after")
    def _size_or_budget(self) -> AdapterConfig:
        if self.adapter_size is not None and self.budget is not None:
            raise ValueError("give --adapter-size or --budget, not both: the budget sets the size")
        return self
