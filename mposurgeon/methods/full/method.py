"""`full`: every parameter trains, MPO cores included."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mposurgeon.methods.full.config import FullConfig
from mposurgeon.methods.mpo.method import MPOTrainingMethod


class FullMethod(MPOTrainingMethod):
    config_class: ClassVar[type[FullConfig]] = FullConfig

    def set_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
