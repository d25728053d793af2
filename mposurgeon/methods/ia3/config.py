"""`ia3` (Liu et al., 2022): the config (which matrices)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from mposurgeon.methods.config import MethodConfig, ModuleRegex, comma_list
from mposurgeon.methods.ia3.record import Ia3Record


class Ia3Config(MethodConfig):
    """IA3 through `peft`: each targeted matrix gets a learned vector, starting at ones (the
    model starts as the base model), that scales its output (keys, values) or, for the FFN
    output projection (`FFN_2`), its input; only the vectors and the task head train. Targets:
    `layers` groups or a `target_modules` regex, else PEFT's default for the model type (key,
    value and `output.dense` for BERT, where PEFT scales the input of both output projections).
    Its size is set by its targets: it takes no budget. Default rate measured on man-sections
    (PEFT's targets, 3 epochs): 0.868 at 1e-2, 0.754 at 3e-3."""

    name: ClassVar[str] = "ia3"
    summary: ClassVar[str] = (
        "IA3 (peft): scaling vectors on keys, values and FFN inputs, and the head train"
    )
    implementation: ClassVar[str] = "mposurgeon.methods.ia3.method:Ia3Method"
    record: ClassVar[type[Ia3Record]] = Ia3Record

    lr: float = Field(1e-2, gt=0, allow_inf_nan=False, description="peak learning rate")
    layers: list[str] | None = Field(None, description="weight groups, e.g. attention,FFN_2")
    target_modules: ModuleRegex = Field(None, description="regex, full match on module names")

    _split = field_validator("layers", mode="before")(comma_list)
