"""`apet`: a sparse update of exactly `budget` elements, chosen at random among the elements
of the targeted matrices.

Each targeted module with chosen elements gets a parametrization of its weight
(`torch.nn.utils.parametrize`): `weight = base + scatter(values at index)`, where `base` is
frozen and `values` (one per chosen element, zero at the start: the model starts as the base
model) train. Live names are torch's (`M.parametrizations.weight.original`,
`M.parametrizations.weight.0.values`); the artifact stores `M.weight`, `M.apet.index`,
`M.apet.values` (`file_key`).
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
from mposurgeon.methods.apet.config import ApetConfig
from mposurgeon.methods.apet.record import ApetRecord
from mposurgeon.methods.base import Method, train_only
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.layers import ForwardMode

#: The weight groups APET spreads its budget over by default: every block matrix.
DEFAULT_LAYERS = ["attention", "FFN_1", "FFN_2"]
_LIVE = (
    (re.compile(r"\.parametrizations\.weight\.original$"), ".weight"),
    (re.compile(r"\.parametrizations\.weight\.0\.(index|values)$"), r".apet.\1"),
)


class SparseDelta(nn.Module):
    """A weight parametrization: `weight` with `values` added at the flat positions `index`
    (of the weight as the module stores it)."""

    def __init__(self, index: Tensor, values: Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.long())
        self.values = nn.Parameter(values)

    def forward(self, weight: Tensor) -> Tensor:
        flat = weight.reshape(-1).index_add(0, self.index, self.values.to(weight.dtype))
        return flat.view_as(weight)


def choose_elements(total: int, budget: int, seed: int) -> Tensor:
    """`budget` distinct flat positions in [0, total), uniformly at random under `seed`,
    ascending (int64). Drawn with replacement and de-duplicated, first draws first, so the
    cost grows with the budget, not with `total`."""
    if budget > total:
        raise UsageError(
            f"apet: --budget {budget:,} is more than the {total:,} elements of the targeted "
            "matrices",
            hint="lower --budget, or target more matrices with --layers / --target-modules",
        )
    generator = torch.Generator().manual_seed(seed)
    picked = np.empty(0, dtype=np.int64)
    while picked.size < budget:
        draw = torch.randint(total, (2 * (budget - picked.size) + 16,), generator=generator)
        merged = np.concatenate([picked, draw.numpy()])
        _, first = np.unique(merged, return_index=True)
        picked = merged[np.sort(first)]
    return torch.from_numpy(np.sort(picked[:budget]))


class ApetMethod(Method):
    config_class: ClassVar[type[ApetConfig]] = ApetConfig
    has_dense_form: ClassVar[bool] = True
    config: ApetConfig

    # -- training ----------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        targets = self._targets(model, records)
        sizes = [t.out_dim * t.in_dim for t in targets]
        picked = choose_elements(sum(sizes), self.config.budget, self.config.budget_seed)
        modules = dict(model.named_modules())
        out: dict[str, ModuleRecord] = {}
        start = 0
        for target, size in zip(targets, sizes, strict=True):
            mine = picked[(picked >= start) & (picked < start + size)] - start
            start += size
            if mine.numel() == 0:
                continue
            weight = modules[target.name].weight
            values = torch.zeros(mine.numel(), dtype=weight.dtype, device=weight.device)
            parametrize.register_parametrization(
                modules[target.name], "weight", SparseDelta(mine.to(weight.device), values)
            )
            out[target.name] = ApetRecord(
                name=target.name,
                method=self.name,
                kind=target.kind,
                weight_key=target.weight_key,
                shape=list(target.shape),
                dtype=str(weight.dtype).removeprefix("torch."),
                params=int(mine.numel()),
                dense_params=size,
                elements=int(mine.numel()),
            )
        return out

    def _targets(self, model: nn.Module, records: Mapping[str, ModuleRecord]) -> list[Target]:
        """The Linear and Conv1D matrices the budget is spread over (not those another
        method transformed, nor embeddings)."""
        cfg = self.config
        layers = cfg.layers if cfg.layers is not None or cfg.target_modules else DEFAULT_LAYERS
        found = select_targets(
            model, model.state_dict().keys(), layers=layers, target_modules=cfg.target_modules
        )
        targets = [t for t in found if t.kind != "embedding" and t.name not in records]
        if not targets:
            raise UsageError(
                "apet: no Linear or Conv1D matrix among the targets",
                hint="target matrices with --layers (e.g. attention,FFN_1) or --target-modules",
            )
        return targets

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: name.endswith(".parametrizations.weight.0.values"))

    def file_key(self, live_key: str) -> str:
        for pattern, replacement in _LIVE:
            live_key = pattern.sub(replacement, live_key)
        return live_key

    # -- the module state it owns ------------------------------------------------------------

    def to_dense(self, record: ModuleRecord, tensors: Mapping[str, Tensor]) -> Tensor:
        assert isinstance(record, ApetRecord)
        index, values = _state(record, tensors)
        flat = tensors[record.weight_key].double().reshape(-1).clone()
        flat.index_add_(0, index, values.double())
        return flat.view(tuple(record.shape))

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        modules = dict(model.named_modules())
        for rec in records:
            if isinstance(rec, ApetRecord):
                index, values = _state(rec, tensors)
                module = modules[rec.name]
                values = values.to(module.weight.dtype)
                parametrize.register_parametrization(module, "weight", SparseDelta(index, values))


def _state(record: ApetRecord, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The positions and values of a module, positions checked to lie in its weight."""
    index = tensors[f"{record.name}.apet.index"].long()
    values = tensors[f"{record.name}.apet.values"]
    size = int(np.prod(record.shape))
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ArtifactError(
            f"{record.name}.apet.index holds positions outside its {size:,}-element weight",
            hint="re-create the artifact with the stage that made it, or restore it",
        )
    return index, values
