"""`bitfit`: parameters named `*.bias` and the task head train; nothing else."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import Method, head_parameter_names, train_only
from mposurgeon.methods.bitfit.config import BitFitConfig


class BitFitMethod(Method):
    config_class: ClassVar[type[BitFitConfig]] = BitFitConfig

    def set_trainable(self, model: nn.Module) -> None:
        head = head_parameter_names(model)
        biases = [n for n, _ in model.named_parameters() if n.endswith(".bias") and n not in head]
        if not biases:
            raise UsageError(
                f"{type(model).__name__} has no bias terms: bitfit would train the head only",
                hint="use --method lora (or another method) for a model without biases",
            )
        train_only(model, lambda name: name.endswith(".bias"))
