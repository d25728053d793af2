"""`ia3` through `peft`: scaling vectors injected in place (`peft.inject_adapter_in_model`, no
`PeftModel` wrapper, so module names stay the model's), merged into the weight (and, for an
output scaling, the bias).

Live names are PEFT's (`M.base_layer.weight`, `M.ia3_l.default`); the artifact stores
`M.weight`, `M.bias` and `M.ia3_l` (`file_key`), so `from_pretrained` on the artifact loads the
base weights and `install` adds the vectors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import Method, train_only
from mposurgeon.methods.ia3.config import Ia3Config
from mposurgeon.methods.ia3.record import Ia3Record
from mposurgeon.methods.peft_layers import (
    ADAPTER,
    fan_in_fan_out,
    names_regex,
    peft_default_targets,
)
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.orientation import as_matrix, as_weight
from mposurgeon.models.surgery import resolve_module_name

#: PEFT's live names -> the artifact's: no `.base_layer`, no adapter name.
_LIVE = re.compile(r"\.base_layer(?=\.)|(?<=\.ia3_l)\.default$")


class Ia3Method(Method):
    config_class: ClassVar[type[Ia3Config]] = Ia3Config
    has_dense_form: ClassVar[bool] = True
    config: Ia3Config

    # -- training ----------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        targets, feedforward = self._targets(model)
        targets = [t for t in targets if t.name not in records]
        if not targets:
            raise UsageError(
                "ia3: every targeted matrix is already transformed (MPO) in this input",
                hint="target other matrices with --layers or --target-modules",
            )
        fan_in_fan_out(targets, self.name)  # one kind of layer, and no embedding
        out = {t.name: _record(self.name, t, t.name in feedforward, model) for t in targets}
        _inject(model, list(out.values()))
        return out

    def _targets(self, model: nn.Module) -> tuple[list[Target], set[str]]:
        """The matrices to scale and which of them scale their input: `layers` /
        `target_modules` (input scaling for `FFN_2`), else PEFT's default targets and
        feedforward modules for the model type, matched against whole module names."""
        cfg = self.config
        keys = model.state_dict().keys()
        if cfg.layers is not None or cfg.target_modules is not None:
            targets = select_targets(
                model, keys, layers=cfg.layers, target_modules=cfg.target_modules
            )
            return targets, {t.name for t in targets if t.group == "FFN_2"}
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

        regex = peft_default_targets(
            model, self.name, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, "attention,FFN_2"
        )
        targets = select_targets(model, keys, target_modules=regex)
        model_type = getattr(model.config, "model_type", "")
        feedforward_regex = names_regex(FEEDFORWARD.get(model_type, []))
        feedforward = {t.name for t in targets if re.fullmatch(feedforward_regex, t.name)}
        return targets, feedforward

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: ".ia3_l." in name)

    def file_key(self, live_key: str) -> str:
        return _LIVE.sub("", live_key)

    # -- the module state it owns ------------------------------------------------------------

    def to_dense(self, record: ModuleRecord, tensors: Mapping[str, Tensor]) -> Tensor:
        assert isinstance(record, Ia3Record)
        weight = as_matrix(tensors[record.weight_key].double(), record.kind)
        scaling = _matrix_scaling(record, tensors)
        return as_weight(weight * scaling, record.kind)

    def dense_tensors(
        self, record: ModuleRecord, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        dense = super().dense_tensors(record, tensors)
        assert isinstance(record, Ia3Record)
        if record.bias_key is not None:
            scaling = _matrix_scaling(record, tensors).flatten()
            dense[record.bias_key] = tensors[record.bias_key].double() * scaling
        return dense

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        ia3 = [r for r in records if isinstance(r, Ia3Record)]
        if not ia3:
            return
        live = {rec.name: resolve_module_name(model, rec.name) for rec in ia3}
        _inject(model, [rec.model_copy(update={"name": live[rec.name]}) for rec in ia3])
        with torch.no_grad():
            for rec in ia3:
                layer = model.get_submodule(live[rec.name])
                layer.ia3_l[ADAPTER].copy_(tensors[f"{rec.name}.ia3_l"])

    # -- PEFT interop -------------------------------------------------------------------------

    def peft_config(self, records: Sequence[ModuleRecord], **common: Any) -> Any:
        import peft

        ia3 = [r for r in records if isinstance(r, Ia3Record)]
        return peft.IA3Config(
            target_modules=[r.name for r in ia3],
            feedforward_modules=[r.name for r in ia3 if r.feedforward],
            fan_in_fan_out=any(r.kind == "conv1d" for r in ia3),
            **common,
        )

    def copy_to_peft(
        self, peft_model: Any, records: Sequence[ModuleRecord], tensors: Mapping[str, Tensor]
    ) -> None:
        model = peft_model.base_model.model
        with torch.no_grad():
            for rec in records:
                layer = model.get_submodule(resolve_module_name(model, rec.name))
                layer.ia3_l[ADAPTER].copy_(tensors[f"{rec.name}.ia3_l"])


def _record(method: str, target: Target, feedforward: bool, model: nn.Module) -> Ia3Record:
    out_dim, in_dim = target.out_dim, target.in_dim
    weight = model.get_submodule(target.name).weight
    return Ia3Record(
        name=target.name,
        method=method,
        kind=target.kind,
        weight_key=target.weight_key,
        shape=list(target.shape),
        dtype=str(weight.dtype).removeprefix("torch."),
        params=in_dim if feedforward else out_dim,
        dense_params=out_dim * in_dim,
        feedforward=feedforward,
        bias_key=None if feedforward else target.bias_key,
    )


def _matrix_scaling(record: Ia3Record, tensors: Mapping[str, Tensor]) -> Tensor:
    """The scaling vector as a (out, 1) or (1, in) float64 factor of the (out, in) matrix."""
    return tensors[f"{record.name}.ia3_l"].double()


def _inject(model: nn.Module, records: Sequence[Ia3Record]) -> None:
    """Put IA3 layers on the modules of `records` (whole names) of `model`, in place."""
    import peft

    kinds = {r.kind for r in records}
    if kinds == {"conv1d", "linear"}:
        raise UsageError(
            "ia3: the targets mix GPT-2 Conv1D and Linear layers, which one IA3 config cannot hold",
            hint="target one kind (e.g. --layers attention,FFN_1,FFN_2)",
        )
    config = peft.IA3Config(
        target_modules=[r.name for r in records],
        feedforward_modules=[r.name for r in records if r.feedforward],
        fan_in_fan_out=kinds == {"conv1d"},
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
