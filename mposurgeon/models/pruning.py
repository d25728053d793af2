"""The math of pruning: which weights or units go, and how a tensor loses or masks them.

Unstructured: `magnitude_masks` marks, per matrix or globally, the round(P x numel) entries of
smallest |w| (ties broken by flat index, the earlier first; global order: the matrices in the
order given, then flat index).

Structured: a `UnitBlock` is one attention block (units: heads, or for grouped-query attention
key/value groups with their query heads) or one FFN block (units: intermediate neurons). Each
unit occupies, in every tensor of the block, the indices `offset + u*size ... offset +
(u+1)*size - 1` along one axis (`UnitSlice`). `ffn_blocks` / `attention_blocks` build the
blocks of a model from its `Target`s; `remove_units` keeps the other units' indices (a smaller
tensor), `unit_mask` marks a unit's entries (for masking in place). `apply_config` writes the
smaller widths into a config where the architecture's config can express them.

This module knows `transformers` configs and the weight-group tables, not files or the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mposurgeon.errors import UsageError
from mposurgeon.models.groups import MODEL_TYPE_ALIASES, Target, attention_projection

#: Model types whose config holds the FFN width, and under which keys (BLOOM's MLP is always
#: 4 x hidden: its neurons are masked, not removed).
FFN_WIDTH_KEYS: dict[str, tuple[str, ...]] = {
    "bert": ("intermediate_size",),
    "roberta": ("intermediate_size",),
    "albert": ("intermediate_size",),
    "distilbert": ("hidden_dim",),
    "bart": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "t5": ("d_ff",),
    "gpt2": ("n_inner",),
    "llama": ("intermediate_size",),
}
#: Model types whose attention heads can be removed physically: the config states the head
#: dimension (Llama family: `head_dim`), so fewer heads do not change it.
HEAD_REMOVAL_TYPES: frozenset[str] = frozenset({"llama"})


def canonical_type(model_type: str) -> str:
    """The weight-group table's name for `model_type` (mistral -> llama, ...)."""
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


# --------------------------------------------------------------------------------------------
# Unstructured
# --------------------------------------------------------------------------------------------


def magnitude_masks(
    weights: Mapping[str, Tensor], sparsity: float, *, global_scope: bool = False
) -> dict[str, Tensor]:
    """Bool masks (True: pruned) of the round(sparsity x n) smallest-|w| entries, n the size of
    each matrix, or with `global_scope` of all matrices together; stable order, so ties go to
    the lower flat index (and, globally, the earlier matrix)."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must lie in (0, 1), got {sparsity}")
    if not global_scope:
        return {
            name: _smallest(w.abs().flatten(), sparsity).view(w.shape)
            for name, w in weights.items()
        }
    flat = torch.cat([w.detach().abs().flatten().double() for w in weights.values()])
    pruned = _smallest(flat, sparsity)
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = pruned[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return masks


def _smallest(values: Tensor, fraction: float) -> Tensor:
    """Bool vector marking the round(fraction x len) smallest `values` (stable order)."""
    k = round(fraction * values.numel())
    order = torch.sort(values.double(), stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


# --------------------------------------------------------------------------------------------
# Structured: units of attention and FFN blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSlice:
    """Where the units lie in one tensor (`key`): unit u is indices offset + u*size ...
    offset + (u+1)*size - 1 along `axis`."""

    key: str
    axis: int
    size: int
    offset: int = 0
    scored: bool = True  # whether its entries count in the unit's magnitude score (weights)

    def indices(self, units: Sequence[int]) -> Tensor:
        """The indices along `axis` of `units` (in order)."""
        idx = [self.offset + u * self.size + j for u in units for j in range(self.size)]
        return torch.tensor(idx, dtype=torch.long)


@dataclass
class UnitBlock:
    """One attention or FFN block: `num_units` units spread over `slices`.

    `unit_heads` is the number of query heads one unit holds (GQA: a key/value group), 1 for
    heads of plain multi-head attention and for neurons.
    """

    name: str
    kind: str  # "heads" or "ffn"
    num_units: int
    slices: list[UnitSlice] = field(default_factory=list)
    unit_heads: int = 1

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.slices]


def layer_key(name: str) -> str:
    """The block a module lies in: its name up to the last numbered component."""
    match = re.match(r"^(.*\.\d+)(?:\.|$)", name)
    return match.group(1) if match else ""


def _attention_key(name: str) -> str:
    """The attention block of a projection: its parent, BERT's `.self` / `.output` dropped."""
    parent = name.rpartition(".")[0]
    return re.sub(r"\.(?:self|output)$", "", parent)


def _out_axis(target: Target) -> int:
    """The axis of the output features in the stored weight (Conv1D stores (in, out))."""
    return 1 if target.kind == "conv1d" else 0


def _in_axis(target: Target) -> int:
    return 0 if target.kind == "conv1d" else 1


def _rows(target: Target, size: int, offset: int = 0) -> list[UnitSlice]:
    """Slices of a projection whose output features hold the units (weight and bias)."""
    slices = [UnitSlice(target.weight_key, _out_axis(target), size, offset)]
    if target.bias_key is not None:
        slices.append(UnitSlice(target.bias_key, 0, size, offset, scored=False))
    return slices


def ffn_blocks(targets: Sequence[Target]) -> list[UnitBlock]:
    """One block per layer from the FFN_1 and FFN_2 targets: neuron u is row u of every FFN_1
    matrix (and bias entry) and column u of the FFN_2 matrix."""
    blocks: dict[str, UnitBlock] = {}
    for t in targets:
        if t.group not in ("FFN_1", "FFN_2"):
            continue
        key = layer_key(t.name)
        width = t.out_dim if t.group == "FFN_1" else t.in_dim
        block = blocks.setdefault(key, UnitBlock(name=key, kind="ffn", num_units=width))
        if block.num_units != width:
            raise UsageError(f"{t.name}: FFN width {width} differs from {block.num_units} in {key}")
        if t.group == "FFN_1":
            block.slices += _rows(t, 1)
        else:
            block.slices.append(UnitSlice(t.weight_key, _in_axis(t), 1))
    return list(blocks.values())


def _num_heads(config: Any, block: str) -> int:
    """Query heads of an attention block (BART's decoder has its own count)."""
    if canonical_type(config.model_type) == "bart" and re.search(r"(?:^|\.)decoder\.", block):
        return int(config.decoder_attention_heads)
    return int(config.num_attention_heads)


def attention_blocks(targets: Sequence[Target], config: Any) -> list[UnitBlock]:
    """One block per attention module from the attention targets, the units its heads (for
    grouped-query attention: its key/value heads, each with the query heads that share it).

    Fused projections: GPT-2 `c_attn` holds [q | k | v] along its outputs; BLOOM's
    `query_key_value` holds (head, 3, head_dim) along its outputs.
    """
    model_type = canonical_type(config.model_type)
    by_block: dict[str, dict[str, Target]] = {}
    for t in targets:
        proj = attention_projection(model_type, t.name)
        if proj is not None:
            by_block.setdefault(_attention_key(t.name), {})[proj] = t
    blocks = []
    for key, projs in by_block.items():
        heads = _num_heads(config, key)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        if "qkv" in projs:
            hidden = projs["qkv"].out_dim // 3
            if "q" in projs or "o" not in projs:
                raise UsageError(
                    f"--heads: the attention block {key} (cross-attention or incomplete) is not "
                    "supported",
                    hint="prune heads of models with self-attention only, or use --sparsity",
                )
        else:
            if not all(p in projs for p in "qkvo"):
                missing = ",".join(p for p in "qkvo" if p not in projs)
                raise UsageError(
                    f"--heads: the attention block {key} lacks its {missing} projection"
                )
            hidden = projs["q"].out_dim
        dim = hidden // heads
        if dim * heads != hidden:
            raise UsageError(f"--heads: {key} has {hidden} features for {heads} heads")
        block = UnitBlock(name=key, kind="heads", num_units=kv_heads, unit_heads=heads // kv_heads)
        rep = heads // kv_heads
        if "qkv" in projs:
            qkv = projs["qkv"]
            if model_type == "bloom":
                block.slices += _rows(qkv, 3 * dim)
            else:  # GPT-2: [q | k | v]
                for part in range(3):
                    block.slices += _rows(qkv, dim, part * hidden)
        else:
            block.slices += _rows(projs["q"], rep * dim)
            block.slices += _rows(projs["k"], dim)
            block.slices += _rows(projs["v"], dim)
        block.slices.append(UnitSlice(projs["o"].weight_key, _in_axis(projs["o"]), rep * dim))
        blocks.append(block)
    return blocks


def magnitude_scores(block: UnitBlock, tensors: Mapping[str, Tensor]) -> Tensor:
    """Per unit, the sum of |w| over its entries in the block's weight matrices (float64)."""
    scores = torch.zeros(block.num_units, dtype=torch.float64)
    for s in block.slices:
        if s.scored:
            scores += _unit_sums(tensors[s.key].detach().abs().double(), s, block.num_units)
    return scores


def slice_scores(block: UnitBlock, elementwise: Mapping[str, Tensor]) -> Tensor:
    """Per unit, the sum of an elementwise score (e.g. squared gradients) over its weights."""
    scores = torch.zeros(block.num_units, dtype=torch.float64)
    for s in block.slices:
        if s.scored and s.key in elementwise:
            scores += _unit_sums(elementwise[s.key].double(), s, block.num_units)
    return scores


def _unit_sums(values: Tensor, s: UnitSlice, units: int) -> Tensor:
    moved = values.movedim(s.axis, 0)
    part = moved[s.offset : s.offset + units * s.size]
    return part.reshape(units, -1).sum(dim=1)


def lowest_units(scores: Tensor, count: int) -> list[int]:
    """The `count` units of lowest score (ties: the lower index), in ascending index order."""
    order = torch.sort(scores, stable=True).indices[:count]
    return sorted(int(u) for u in order)


def remove_units(tensor: Tensor, s: UnitSlice, num_units: int, drop: Sequence[int]) -> Tensor:
    """`tensor` without the entries of units `drop` along the slice's axis."""
    gone = set(s.indices(drop).tolist())
    keep = [i for i in range(tensor.shape[s.axis]) if i not in gone]
    return tensor.index_select(s.axis, torch.tensor(keep, dtype=torch.long)).contiguous()


def unit_mask(shape: Sequence[int], s: UnitSlice, drop: Sequence[int]) -> Tensor:
    """Bool mask of `shape` (True: pruned) of the entries of units `drop`."""
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    mask.index_fill_(s.axis, s.indices(drop), True)
    return mask


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def can_remove(config: Any, kind: str) -> bool:
    """Whether the config can express blocks of `kind` ("ffn", "heads") with fewer units."""
    model_type = canonical_type(config.model_type)
    return model_type in (FFN_WIDTH_KEYS if kind == "ffn" else HEAD_REMOVAL_TYPES)


def apply_config(config: Any, kind: str, count: int) -> dict[str, Any]:
    """Shrink `config` (in place) by `count` units per block of `kind`; return what changed
    ({key: [before, after]})."""
    model_type = canonical_type(config.model_type)
    changed: dict[str, Any] = {}
    if kind == "ffn":
        for key in FFN_WIDTH_KEYS[model_type]:
            before = getattr(config, key, None)
            if before is None and key == "n_inner":  # GPT-2: None means 4 x n_embd
                before = 4 * config.n_embd
            setattr(config, key, int(before) - count)
            changed[key] = [int(before), int(before) - count]
    else:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        rep = heads // kv
        config.head_dim = dim
        config.num_attention_heads = heads - count * rep
        config.num_key_value_heads = kv - count
        changed = {
            "num_attention_heads": [heads, heads - count * rep],
            "num_key_value_heads": [kv, kv - count],
            "head_dim": [dim, dim],
        }
    return changed


# --------------------------------------------------------------------------------------------
# Masks kept in an artifact, and kept during training
# --------------------------------------------------------------------------------------------

#: The tensor that masks `M.<param>` is `M.prune.<param>_mask` (bool, the tensor's stored shape,
#: True where the entry is pruned and must stay exactly zero).
_MASK_KEY = re.compile(r"^(?P<module>.+)\.prune\.(?P<param>[A-Za-z0-9_]+)_mask$")


def mask_key(tensor_key: str) -> str:
    """The name of the mask of tensor `tensor_key` (`M.weight` -> `M.prune.weight_mask`)."""
    module, _, param = tensor_key.rpartition(".")
    return f"{module}.prune.{param}_mask"


def masked_key(key: str) -> str | None:
    """The tensor that mask `key` masks, or None if `key` is no mask name."""
    match = _MASK_KEY.fullmatch(key)
    return f"{match['module']}.{match['param']}" if match else None


def keep_pruned(model: torch.nn.Module, masks: Mapping[str, Tensor]) -> list[Any]:
    """Keep the parameters `masks` names (live names -> bool masks, True: pruned) at zero.

    Each parameter is zeroed now; a forward pre-hook on its module zeroes it again before every
    forward (so the loss sees the masked weight whatever the optimizer did), and from the first
    forward on, when it takes gradients, a gradient hook zeroes the gradient of its pruned
    entries (so Adam's moments stay zero there). Returns the hook handles.
    """
    handles: list[Any] = []
    params = dict(model.named_parameters())
    by_module: dict[str, list[tuple[torch.nn.Parameter, Tensor]]] = {}
    for name, mask in masks.items():
        param = params[name]
        mask = mask.to(device=param.device, dtype=torch.bool)
        with torch.no_grad():
            param.masked_fill_(mask, 0)
        by_module.setdefault(name.rpartition(".")[0], []).append((param, mask))
    for module_name, pairs in by_module.items():
        module = model.get_submodule(module_name)
        handles.append(module.register_forward_pre_hook(_Zeroer(pairs, handles)))
    return handles


class _Zeroer:
    """A forward pre-hook: zero the pruned entries of its module's parameters and, once they
    take gradients, hook their gradients (masks follow the parameters to their device)."""

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, Tensor]], handles: list[Any]) -> None:
        self.pairs = pairs
        self.handles = handles
        self.hooked: set[int] = set()

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        for i, (param, mask) in enumerate(self.pairs):
            if mask.device != param.device:
                self.pairs[i] = (param, mask.to(param.device))
            with torch.no_grad():
                param.masked_fill_(self.pairs[i][1], 0)
            if param.requires_grad and i not in self.hooked:
                self.hooked.add(i)
                self.handles.append(param.register_hook(lambda g, i=i: self._grad(g, i)))

    def _grad(self, grad: Tensor, i: int) -> Tensor:
        mask = self.pairs[i][1]
        return grad.masked_fill(mask.to(grad.device), 0)


class KeepZeros(nn.Module):
    """A weight parametrization (`torch.nn.utils.parametrize`): the weight with its pruned
    entries (`pruned`, bool, the weight's shape) set to zero, so no update stacked on the stored
    weight (a sparse delta, say) can fill them; their gradients are zero."""

    def __init__(self, pruned: Tensor) -> None:
        super().__init__()
        self.register_buffer("pruned", pruned.to(torch.bool), persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        return weight.masked_fill(self.pruned, 0)


class KeepZerosBeside(nn.Module):
    """A weight parametrization for a layer that adds a separate update to its weight's output
    (LoRA: y = x W^T + x ΔW^T): W becomes (W + ΔW) with the pruned entries zeroed, minus ΔW, so
    the layer computes the pruned merged weight, x ((W + ΔW) ⊙ kept)^T, as `merge` writes it
    (exactly while the update sees the same input: LoRA dropout 0). `delta` gives ΔW as the
    weight stores it, with gradients; it is held as a plain callable, not a submodule."""

    def __init__(self, pruned: Tensor, delta: Callable[[], Tensor]) -> None:
        super().__init__()
        self.register_buffer("pruned", pruned.to(torch.bool), persistent=False)
        self.delta = delta

    def forward(self, weight: Tensor) -> Tensor:
        delta = self.delta().to(weight.dtype)
        return (weight + delta).masked_fill(self.pruned, 0) - delta
