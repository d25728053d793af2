"""`dsee`: LoRA (through `peft`, injected in place as the `lora` method does) plus a sparse
update on a fixed support, merged as W + (alpha / r) B A + S.

Each targeted module M becomes PEFT's LoRA layer around M (`M.base_layer`), and the base
layer's weight gets a parametrization (`torch.nn.utils.parametrize`, APET's `SparseDelta`):
`weight = base + scatter(values at index)`, `index` the support chosen before training
(`methods/dsee/support.py`), `values` zero at the start (with B zero, the model starts as the
base model bit for bit). Live names: `M.base_layer.parametrizations.weight.original`,
`M.base_layer.parametrizations.weight.0.{index,values}`, `M.lora_A.default.weight`; the
artifact stores `M.weight`, `M.dsee.index`, `M.dsee.values`, `M.lora_A.weight` (`file_key`),
so `from_pretrained` on the artifact loads the base weights and `install` adds the rest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mposurgeon.errors import ArtifactError, UsageError
from mposurgeon.methods.apet.method import SparseDelta
from mposurgeon.methods.base import Method, train_only
from mposurgeon.methods.dsee.config import DEFAULT_LAYERS, DEFAULT_PROJECTIONS, DseeConfig
from mposurgeon.methods.dsee.record import DseeRecord
from mposurgeon.methods.dsee.support import godec_support, magnitude_support, random_support
from mposurgeon.methods.peft_layers import ADAPTER, fan_in_fan_out, inject_lora
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.groups import Target, attention_projection, select_targets
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.orientation import as_weight
from mposurgeon.models.surgery import resolve_module_name

#: Live names -> the artifact's, applied in order.
_LIVE = (
    (re.compile(r"\.base_layer\.parametrizations\.weight\.original$"), ".weight"),
    (re.compile(r"\.base_layer\.parametrizations\.weight\.0\.(index|values)$"), r".dsee.\1"),
    (re.compile(r"\.base_layer(?=\.)"), ""),
    (re.compile(r"(?<=\.lora_[AB])\.default(?=\.)"), ""),
)
#: The live name of a sparse update's values (what trains besides the LoRA factors).
_VALUES = ".base_layer.parametrizations.weight.0.values"


class DseeMethod(Method):
    config_class: ClassVar[type[DseeConfig]] = DseeConfig
    has_dense_form: ClassVar[bool] = True
    config: DseeConfig

    # -- training ----------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        cfg = self.config
        targets = self._targets(model, records)
        conv1d = fan_in_fan_out(targets, self.name)
        _check_sizes(targets, cfg.sparse_size)
        modules = dict(model.named_modules())
        weights = {t.name: modules[t.name].weight for t in targets}
        supports = self._supports(targets, weights)
        names = [t.name for t in targets]
        inject_lora(model, names, cfg.lora_r, cfg.alpha, cfg.lora_dropout, conv1d=conv1d)
        out: dict[str, ModuleRecord] = {}
        for t in targets:
            weight = weights[t.name]
            values = torch.zeros(cfg.sparse_size, dtype=weight.dtype, device=weight.device)
            base = model.get_submodule(t.name).base_layer
            delta = SparseDelta(supports[t.name].to(weight.device), values)
            parametrize.register_parametrization(base, "weight", delta)
            out[t.name] = DseeRecord(
                name=t.name,
                method=self.name,
                kind=t.kind,
                weight_key=t.weight_key,
                shape=list(t.shape),
                dtype=str(weight.dtype).removeprefix("torch."),
                params=cfg.lora_r * (t.out_dim + t.in_dim) + cfg.sparse_size,
                dense_params=t.out_dim * t.in_dim,
                r=cfg.lora_r,
                alpha=cfg.alpha,
                sparse_size=cfg.sparse_size,
                sparse_init=cfg.sparse_init,
            )
        return out

    def _targets(self, model: nn.Module, records: Mapping[str, ModuleRecord]) -> list[Target]:
        """The matrices to adapt (`layers` / `target_modules`; by default the query and value
        projections, fused ones included, as the paper), not those another method
        transformed."""
        cfg = self.config
        chosen = cfg.layers is not None or cfg.target_modules is not None
        layers = cfg.layers if chosen else DEFAULT_LAYERS
        found = select_targets(
            model, model.state_dict().keys(), layers=layers, target_modules=cfg.target_modules
        )
        if not chosen:
            model_type = getattr(model.config, "model_type", "") or ""
            found = [
                t for t in found if attention_projection(model_type, t.name) in DEFAULT_PROJECTIONS
            ]
        targets = [t for t in found if t.name not in records]
        if not targets:
            raise UsageError(
                "dsee: every targeted matrix is already transformed (MPO) in this input",
                hint="target other matrices with --layers or --target-modules",
            )
        return targets

    def _supports(
        self, targets: Sequence[Target], weights: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The support of each target's sparse update (flat positions in the weight as
        stored). On the meta device (a dry run counts, nothing is read) a placeholder."""
        cfg = self.config
        size, init = cfg.sparse_size, cfg.sparse_init
        generator = None
        if init == "random":  # seeded by the run's seed (the global generator, seeded)
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        supports: dict[str, Tensor] = {}
        for t in targets:
            weight = weights[t.name]
            if weight.is_meta:
                supports[t.name] = torch.arange(size, device="meta")
            elif init == "godec":
                supports[t.name] = godec_support(weight, cfg.lora_r, size)
            elif init == "magnitude":
                supports[t.name] = magnitude_support(weight, size)
            else:
                assert generator is not None
                supports[t.name] = random_support(weight.numel(), size, generator)
        return supports

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: ".lora_" in name or name.endswith(_VALUES))

    def file_key(self, live_key: str) -> str:
        for pattern, replacement in _LIVE:
            live_key = pattern.sub(replacement, live_key)
        return live_key

    # -- the module state it owns ------------------------------------------------------------

    def to_dense(self, record: ModuleRecord, tensors: Mapping[str, Tensor]) -> Tensor:
        assert isinstance(record, DseeRecord)
        weight = tensors[record.weight_key].double()
        a = tensors[f"{record.name}.lora_A.weight"].double()
        b = tensors[f"{record.name}.lora_B.weight"].double()
        dense = weight + as_weight(record.scaling * (b @ a), record.kind)
        index, values = _sparse_state(record, tensors)
        flat = dense.reshape(-1).index_add(0, index, values.double())
        return flat.view(tuple(record.shape))

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        dsee = [r for r in records if isinstance(r, DseeRecord)]
        if not dsee:
            return
        settings = {(r.r, r.alpha) for r in dsee}
        if len(settings) > 1:
            raise ArtifactError(
                f"DSEE modules of several ranks or alphas ({sorted(settings)}) in one artifact",
                hint="re-create the artifact with the stage that made it, or restore it",
            )
        ((rank, alpha),) = settings
        live = {rec.name: resolve_module_name(model, rec.name) for rec in dsee}
        conv1d = any(r.kind == "conv1d" for r in dsee)
        inject_lora(model, list(live.values()), rank, alpha, 0.0, conv1d=conv1d)
        with torch.no_grad():
            for rec in dsee:
                layer = model.get_submodule(live[rec.name])
                for factor in ("A", "B"):
                    target = getattr(layer, f"lora_{factor}")[ADAPTER].weight
                    target.copy_(tensors[f"{rec.name}.lora_{factor}.weight"])
                base = layer.base_layer
                index, values = _sparse_state(rec, tensors)
                values = values.to(base.weight.device, base.weight.dtype)
                delta = SparseDelta(index.to(base.weight.device), values)
                parametrize.register_parametrization(base, "weight", delta)


def _check_sizes(targets: Sequence[Target], size: int) -> None:
    """Refuse a support larger than a targeted matrix."""
    small = [t for t in targets if t.out_dim * t.in_dim < size]
    if small:
        t = min(small, key=lambda t: t.out_dim * t.in_dim)
        raise UsageError(
            f"dsee: --sparse-size {size:,} is more than the {t.out_dim * t.in_dim:,} entries "
            f"of {t.name} ({t.out_dim} x {t.in_dim})",
            hint="lower --sparse-size, or leave the small matrices out of --layers / "
            "--target-modules",
        )


def _sparse_state(record: DseeRecord, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The support and values of a module's sparse update, the positions checked to be
    distinct and to lie in its weight."""
    index = tensors[f"{record.name}.dsee.index"].long()
    values = tensors[f"{record.name}.dsee.values"]
    size = int(np.prod(record.shape))
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ArtifactError(
            f"{record.name}.dsee.index holds positions outside its {size:,}-element weight",
            hint="re-create the artifact with the stage that made it, or restore it",
        )
    if index.unique().numel() != index.numel():
        raise ArtifactError(
            f"{record.name}.dsee.index holds a position twice",
            hint="re-create the artifact with the stage that made it, or restore it",
        )
    return index, values
