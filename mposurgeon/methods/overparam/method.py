"""`overparam` (OPF, ALGORITHMS.md section 3): every parameter trains, all MPO cores (central
included) and the rest. The matrices a `select` stage chose are decomposed losslessly in place
before training (dynamic selection decomposes more during training: training/dynamic.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import TrainingSource
from mposurgeon.methods.mpo.method import MPOTrainingMethod
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import decompose_in_place
from mposurgeon.methods.overparam.config import OverparamConfig
from mposurgeon.methods.records import ModuleRecord


class OverparamMethod(MPOTrainingMethod):
    config_class: ClassVar[type[OverparamConfig]] = OverparamConfig
    config: OverparamConfig

    def check_source(self, source: TrainingSource) -> None:
        has_mpo = any(isinstance(r, MPORecord) for r in source.records.values())
        if not (has_mpo or source.dynamic or source.chosen):
            raise UsageError(
                f"--method overparam trains MPO cores, and {source.path} has no MPO modules and "
                "no selection",
                hint="decompose it, choose matrices with `mposurgeon select`, or pass "
                "--dynamic --split-num K --top-n N",
            )

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        todo = [name for name in chosen if name not in records]
        return dict(decompose_in_place(model, todo, self.config.num_cores))

    def set_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
