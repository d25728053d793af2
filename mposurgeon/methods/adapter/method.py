"""`adapter`: a bottleneck module attached to each targeted projection (`M.adapter`) and a
forward hook that adds its output: y -> y + up(gelu(down(y))). The module keeps its name and
its weights; the adapter's tensors are stored under `M.adapter.*` as they live."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.adapter.config import DEFAULT_SIZE, AdapterConfig
from mposurgeon.methods.adapter.record import AdapterRecord
from mposurgeon.methods.base import Method, train_only
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.groups import Target, attention_projection, select_targets
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.surgery import resolve_module_name


class Bottleneck(nn.Module):
    """down (d -> size), GELU, up (size -> d); `up` starts at zero."""

    def __init__(self, width: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, size)
        self.up = nn.Linear(size, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


def _add_adapter(module: nn.Module, width: int, size: int) -> Bottleneck:
    """Attach a bottleneck to `module`'s output (as `module.adapter`, through a hook)."""
    weight = module.weight
    adapter = Bottleneck(width, size).to(device=weight.device, dtype=weight.dtype)
    module.adapter = adapter
    module.register_forward_hook(lambda _module, _inputs, output: adapter(output))
    return adapter


class AdapterMethod(Method):
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    config: AdapterConfig

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        targets = [t for t in _targets(model) if t.name not in records]
        if not targets:
            raise UsageError(
                "adapter: no attention or FFN output projection to attach adapters to",
                hint="adapters follow the attention output and FFN_2 matrices of the blocks",
            )
        size = self._size(targets)
        modules = dict(model.named_modules())
        out: dict[str, ModuleRecord] = {}
        for t in targets:
            _add_adapter(modules[t.name], t.out_dim, size)
            out[t.name] = AdapterRecord(
                name=t.name,
                method=self.name,
                kind=t.kind,
                weight_key=t.weight_key,
                shape=list(t.shape),
                dtype=str(modules[t.name].weight.dtype).removeprefix("torch."),
                params=size * (2 * t.out_dim + 1) + t.out_dim,
                dense_params=t.out_dim * t.in_dim,
                size=size,
            )
        return out

    def _size(self, targets: Sequence[Target]) -> int:
        """`adapter_size`, or the largest size whose adapters fit in `budget`."""
        cfg = self.config
        if cfg.budget is None:
            return cfg.adapter_size or DEFAULT_SIZE
        per_size = sum(2 * t.out_dim + 1 for t in targets)
        fixed = sum(t.out_dim for t in targets)  # the up biases
        size = (cfg.budget - fixed) // per_size
        if size < 1:
            raise UsageError(
                f"adapter: --budget {cfg.budget:,} is below one unit: size 1 of these "
                f"{len(targets)} adapters trains {per_size + fixed:,} parameters",
                hint=f"raise --budget to at least {per_size + fixed:,}",
            )
        return size

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: ".adapter." in name)

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        with torch.no_grad():
            for rec in records:
                if not isinstance(rec, AdapterRecord):
                    continue
                width = rec.tensor_shapes()[f"{rec.name}.adapter.up.bias"][0]
                module = model.get_submodule(resolve_module_name(model, rec.name))
                adapter = _add_adapter(module, width, rec.size)
                for key, param in adapter.named_parameters():
                    param.copy_(tensors[f"{rec.name}.adapter.{key}"])


def _targets(model: nn.Module) -> list[Target]:
    """The attention output projections and the FFN output projections of the blocks."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    found = select_targets(model, model.state_dict().keys(), layers=["attention", "FFN_2"])
    return [
        t
        for t in found
        if t.kind != "embedding"
        and (t.group == "FFN_2" or attention_projection(model_type, t.name) == "o")
    ]
