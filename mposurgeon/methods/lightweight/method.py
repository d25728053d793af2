"""`lightweight` (MPOP, ALGORITHMS.md section 2): the central core of every MPO is frozen;
auxiliary cores, biases, norm layers (LayerNorm, RMSNorm) and the task head train; every other
weight (embeddings, dense matrices) stays frozen."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import TrainingSource, head_parameter_names, is_norm
from mposurgeon.methods.lightweight.config import LightweightConfig
from mposurgeon.methods.mpo.method import MPOTrainingMethod
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import mpo_cores


class LightweightMethod(MPOTrainingMethod):
    config_class: ClassVar[type[LightweightConfig]] = LightweightConfig

    def check_source(self, source: TrainingSource) -> None:
        if not any(isinstance(r, MPORecord) for r in source.records.values()):
            raise UsageError(
                f"--method lightweight trains the auxiliary cores of MPO modules, and "
                f"{source.path} has none",
                hint=f"decompose it first: mposurgeon decompose {source.path} "
                "--layers FFN_1,attention",
            )

    def set_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in model.modules():
            if is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
        head = head_parameter_names(model)
        for name, p in model.named_parameters():
            if name in head or name.endswith(".bias"):
                p.requires_grad_(True)
        for cores in mpo_cores(model).values():
            for k, core in enumerate(cores.core):
                core.requires_grad_(k != cores.central_index)
