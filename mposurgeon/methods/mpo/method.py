"""The MPO family's implementation: `mpo` owns the cores in the artifact (merge contracts
them, `load_model` installs MPO layers); `MPOTrainingMethod` is the base of the methods that
train MPO cores (full, lightweight, overparam), whose cores get their own learning rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from mposurgeon.methods.base import Method, split_decay
from mposurgeon.methods.mpo.config import MPOConfig, MPOTrainingConfig
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import (
    MPOStructure,
    dense_weight,
    install_cores,
    module_state,
    mpo_cores,
    mpo_structure,
    record_cores,
    trained_records,
)
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.surgery import install_mpo_layers


class MPOMethod(Method):
    """Modules held as MPO cores `M.mpo.core.k`."""

    config_class: ClassVar[type[MPOConfig]] = MPOConfig
    has_dense_form: ClassVar[bool] = True

    def to_dense(self, record: ModuleRecord, tensors: Mapping[str, Tensor]) -> Tensor:
        assert isinstance(record, MPORecord)
        return dense_weight(record, record_cores(record, tensors))

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        states = [module_state(rec, tensors) for rec in records if isinstance(rec, MPORecord)]
        install_mpo_layers(model, states, forward_mode)


class MPOTrainingMethod(MPOMethod):
    """A method that trains a model whose MPO modules stay MPO: the cores form the optimizer
    group `mpo` (learning rate `mpo_lr`, default `lr`), and the records are updated to the
    trained cores."""

    config_class: ClassVar[type[MPOTrainingConfig]] = MPOTrainingConfig
    config: MPOTrainingConfig

    def parameter_groups(self, model: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
        cores = [c for mpo in mpo_cores(model).values() for c in mpo.core if c.requires_grad]
        decay, no_decay = split_decay(model, exclude={id(c) for c in cores})
        lr = self.config.lr
        mpo_lr = self.config.mpo_lr if self.config.mpo_lr is not None else lr
        return [
            {"name": "mpo", "params": cores, "lr": mpo_lr, "weight_decay": weight_decay},
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]

    def live_structure(self, model: nn.Module) -> dict[str, Any]:
        return {name: s.to_dict() for name, s in mpo_structure(model).items()}

    def restore_structure(
        self, model: nn.Module, structure: Mapping[str, Any], tensors: Mapping[str, Tensor]
    ) -> None:
        install_cores(model, {n: MPOStructure.from_dict(s) for n, s in structure.items()}, tensors)

    def trained_records(
        self, model: nn.Module, records: dict[str, ModuleRecord]
    ) -> dict[str, ModuleRecord]:
        mpo = {n: r for n, r in records.items() if isinstance(r, MPORecord)}
        return {**records, **trained_records(model, mpo)}
