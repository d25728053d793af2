"""`lora` through `peft`: adapters injected in place (`peft.inject_adapter_in_model`, no
`PeftModel` wrapper, so module names stay the model's), merged as W + (alpha / r) B A.

Live names are PEFT's (`M.base_layer.weight`, `M.lora_A.default.weight`); the artifact stores
`M.weight`, `M.lora_A.weight`, `M.lora_B.weight` (`file_key`), so `from_pretrained` on the
artifact loads the base weights and `install` adds the factors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mposurgeon.errors import ArtifactError, UsageError
from mposurgeon.methods.base import Method, train_only
from mposurgeon.methods.lora.config import LoraConfig
from mposurgeon.methods.lora.record import LoraRecord
from mposurgeon.methods.peft_layers import (
    ADAPTER,
    fan_in_fan_out,
    inject_lora,
    peft_default_targets,
)
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.orientation import as_weight
from mposurgeon.models.surgery import resolve_module_name

#: PEFT's live names -> the artifact's: no `.base_layer`, no adapter name.
_LIVE = re.compile(r"\.base_layer(?=\.)|(?<=\.lora_[AB])\.default(?=\.)")
#: A base weight kept pruned (`keep_zeros`) lives under `parametrizations`.
_PARAMETRIZED = re.compile(r"\.parametrizations\.weight\.original$")


class LoraMethod(Method):
    config_class: ClassVar[type[LoraConfig]] = LoraConfig
    has_dense_form: ClassVar[bool] = True
    config: LoraConfig

    # -- training ----------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        targets = [t for t in self._targets(model) if t.name not in records]
        if not targets:
            raise UsageError(
                "lora: every targeted matrix is already transformed (MPO) in this input",
                hint="target other matrices with --layers or --target-modules",
            )
        cfg = self.config
        per_rank = sum(t.out_dim + t.in_dim for t in targets)
        rank = cfg.rank(per_rank)
        if rank < 1:
            raise UsageError(
                f"lora: --budget {cfg.budget:,} is below one rank: rank 1 of these "
                f"{len(targets)} matrices trains {per_rank:,} parameters",
                hint=f"raise --budget to at least {per_rank:,}, or target fewer matrices",
            )
        inject_lora(
            model,
            [t.name for t in targets],
            rank,
            cfg.lora_alpha,
            cfg.lora_dropout,
            conv1d=fan_in_fan_out(targets, self.name),
        )

        state = model.state_dict()
        return {
            t.name: LoraRecord(
                name=t.name,
                method=self.name,
                kind=t.kind,
                weight_key=t.weight_key,
                shape=list(t.shape),
                dtype=str(state[f"{t.name}.base_layer.weight"].dtype).removeprefix("torch."),
                params=rank * (t.out_dim + t.in_dim),
                dense_params=t.out_dim * t.in_dim,
                r=rank,
                alpha=cfg.lora_alpha,
            )
            for t in targets
        }

    def _targets(self, model: nn.Module) -> list[Target]:
        """The matrices to adapt: `layers` / `target_modules`, else PEFT's default for the
        model type (query and value for BERT), matched against whole module names."""
        cfg = self.config
        layers, regex = cfg.layers, cfg.target_modules
        if layers is None and regex is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

            regex = peft_default_targets(
                model, self.name, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "attention"
            )
        keys = model.state_dict().keys()
        return select_targets(model, keys, layers=layers, target_modules=regex)

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: ".lora_" in name)

    def file_key(self, live_key: str) -> str:
        return _PARAMETRIZED.sub(".weight", _LIVE.sub("", live_key))

    # -- the module state it owns ------------------------------------------------------------

    def to_dense(self, record: ModuleRecord, tensors: Mapping[str, Tensor]) -> Tensor:
        assert isinstance(record, LoraRecord)
        weight = tensors[record.weight_key].double()
        a = tensors[f"{record.name}.lora_A.weight"].double()
        b = tensors[f"{record.name}.lora_B.weight"].double()
        return weight + as_weight(record.scaling * (b @ a), record.kind)

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        lora = [r for r in records if isinstance(r, LoraRecord)]
        if not lora:
            return
        rank, alpha = _rank_alpha(lora)
        live = {rec.name: resolve_module_name(model, rec.name) for rec in lora}
        inject_lora(model, list(live.values()), rank, alpha, 0.0,
                conv1d=any(r.kind == "conv1d" for r in lora))  # fmt: skip
        with torch.no_grad():
            for rec in lora:
                layer = model.get_submodule(live[rec.name])
                for factor in ("A", "B"):
                    target = getattr(layer, f"lora_{factor}")[ADAPTER].weight
                    target.copy_(tensors[f"{rec.name}.lora_{factor}.weight"])

    # -- PEFT interop -------------------------------------------------------------------------

    def peft_config(self, records: Sequence[ModuleRecord], **common: Any) -> Any:
        import peft

        rank, alpha = _rank_alpha([r for r in records if isinstance(r, LoraRecord)])
        return peft.LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=[r.name for r in records],
            fan_in_fan_out=any(r.kind == "conv1d" for r in records),
            **common,
        )

    def copy_to_peft(
        self, peft_model: Any, records: Sequence[ModuleRecord], tensors: Mapping[str, Tensor]
    ) -> None:
        model = peft_model.base_model.model
        with torch.no_grad():
            for rec in records:
                layer = model.get_submodule(resolve_module_name(model, rec.name))
                for factor in ("A", "B"):
                    weight = getattr(layer, f"lora_{factor}")[ADAPTER].weight
                    weight.copy_(tensors[f"{rec.name}.lora_{factor}.weight"])


def _rank_alpha(records: Sequence[LoraRecord]) -> tuple[int, float]:
    """The one (rank, alpha) of `records`: one LoRA config holds them all."""
    settings = {(r.r, r.alpha) for r in records}
    if len(settings) > 1:
        raise ArtifactError(
            f"LoRA modules of several ranks or alphas ({sorted(settings)}) in one artifact"
        )
    ((rank, alpha),) = settings
    return rank, alpha
