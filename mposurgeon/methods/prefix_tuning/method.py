"""`prefix-tuning` through `transformers`' attention interface: the model's attention
implementation becomes `mposurgeon_prefix`, which prepends an attention module's trained keys
and values (a slice of `E.prefix`, E the input embeddings) to the input's own and calls the
SDPA attention with the mask grown to match (the prefix is visible to every position). Every
architecture whose attention modules call the interface gets it, encoders included, and a
cache (generation) keeps working: the prefix is added after the cache, never stored in it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import Method, input_embeddings, train_only
from mposurgeon.methods.prefix_tuning.config import PrefixTuningConfig
from mposurgeon.methods.prefix_tuning.record import PrefixRecord
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.surgery import resolve_module_name

#: The attention implementation name registered with `transformers`.
IMPLEMENTATION = "mposurgeon_prefix"
#: The attribute of an attention module that gives its prefix, (2, kv_heads, P, head_dim).
_SOURCE = "_mposurgeon_prefix"
#: While a probe runs: attention module id -> its keys and values (rows, kv_heads, T, dim).
_probed: dict[int, tuple[Tensor, Tensor]] | None = None
#: Tokens per row when the prefix starts from vocabulary tokens.
_ROW = 32


class PrefixTuningMethod(Method):
    config_class: ClassVar[type[PrefixTuningConfig]] = PrefixTuningConfig
    config: PrefixTuningConfig

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        name, embeddings = input_embeddings(model)
        attention = _attention_modules(model)
        shapes = {shape for _, shape in attention}
        if len(shapes) > 1:
            raise UsageError(
                f"prefix-tuning: the attention modules of {type(model).__name__} have keys of "
                f"several shapes {sorted(shapes)}, which one prefix tensor cannot hold"
            )
        ((kv_heads, head_dim),) = shapes
        per_token = len(attention) * 2 * kv_heads * head_dim
        length = self.config.length(per_token)
        if length < 1:
            raise UsageError(
                f"prefix-tuning: --budget {self.config.budget:,} is below one virtual token "
                f"({per_token:,} parameters: {len(attention)} attention modules x keys and "
                f"values x {kv_heads * head_dim})",
                hint=f"raise --budget to at least {per_token:,}",
            )
        weight = embeddings.weight
        record = PrefixRecord(
            name=name,
            method=self.name,
            kind="embedding",
            weight_key=f"{name}.weight",
            shape=list(weight.shape),
            dtype=str(weight.dtype).removeprefix("torch."),
            params=length * per_token,
            dense_params=weight.numel(),
            num_virtual_tokens=length,
            attention_modules=[n for n, _ in attention],
            kv_heads=kv_heads,
            head_dim=head_dim,
        )
        if self.config.prefix_init == "vocab":
            start = _vocabulary_prefix(model, record.attention_modules, length)
        else:
            start = torch.randn(record.prefix_shape(), dtype=weight.dtype).to(weight.device)
        _add_prefix(model, embeddings, record.attention_modules, start)
        return {name: record}

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: name.endswith(".prefix"))

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        for rec in records:
            if isinstance(rec, PrefixRecord):
                embeddings = model.get_submodule(resolve_module_name(model, rec.name))
                names = [resolve_module_name(model, n) for n in rec.attention_modules]
                _add_prefix(model, embeddings, names, tensors[f"{rec.name}.prefix"])


def _add_prefix(
    model: nn.Module, embeddings: nn.Module, attention: Sequence[str], start: Tensor
) -> None:
    """Give `embeddings` the parameter `prefix` (a copy of `start`), point attention module i
    of `attention` at `prefix[i]`, and switch the model to the prefix attention."""
    weight = embeddings.weight
    embeddings.prefix = nn.Parameter(start.to(device=weight.device, dtype=weight.dtype).clone())
    for i, name in enumerate(attention):
        module = model.get_submodule(name)
        # a plain attribute (in __dict__): nn.Module would register a module as a child
        module.__dict__[_SOURCE] = functools.partial(_slice, embeddings, i)
    _register()
    model.set_attn_implementation(IMPLEMENTATION)


def _slice(embeddings: nn.Module, index: int) -> Tensor:
    return embeddings.prefix[index]


def _attention_modules(model: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """The attention modules that call the attention interface, in module order, with the
    (kv_heads, head_dim) of their keys, found by running the model once on two tokens."""
    candidates = [(n, m) for n, m in model.named_modules() if _calls_interface(type(m))]
    if not candidates:
        raise UsageError(
            f"prefix-tuning: the attention of {type(model).__name__} does not go through "
            "transformers' attention interface, where the prefix is added",
            hint="use --method prompt-tuning (or lora) for this model",
        )
    device = next(model.parameters()).device
    seen = _probe(model, torch.ones(1, 2, dtype=torch.long, device=device))
    found = [(n, seen[id(m)][0].shape) for n, m in candidates if id(m) in seen]
    return [(n, (shape[1], shape[3])) for n, shape in found]


def _vocabulary_prefix(model: nn.Module, attention: Sequence[str], length: int) -> Tensor:
    """(modules, 2, kv_heads, length, head_dim): the keys and values each attention module
    computes for `length` random vocabulary tokens (read in rows of at most `_ROW` tokens,
    within the model's positions): the prefix those tokens would be as input."""
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = -(-length // _ROW)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (rows, min(length, _ROW))).to(device)
    seen = _probe(model, ids)
    modules = [model.get_submodule(name) for name in attention]

    def tokens(t: Tensor) -> Tensor:  # (rows, kv_heads, T, dim) -> (kv_heads, length, dim)
        return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3])[:, :length]

    return torch.stack(
        [torch.stack([tokens(seen[id(m)][0]), tokens(seen[id(m)][1])]) for m in modules]
    )


def _probe(model: nn.Module, ids: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Run `model` on `ids` (rows, T) with the prefix attention recording each attention
    module's keys and values (rows, kv_heads, T, dim) by module id."""
    global _probed
    _register()
    previous = model.config._attn_implementation
    inputs: dict[str, Tensor] = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    _probed = {}
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        with torch.no_grad():
            model(**inputs)
        return _probed
    finally:
        _probed = None
        model.set_attn_implementation(previous)


@functools.cache
def _calls_interface(cls: type) -> bool:
    """Whether `cls.forward` calls `transformers`' attention interface."""
    forward = getattr(cls, "forward", None)
    if not issubclass(cls, nn.Module) or forward is None:
        return False
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


@functools.cache
def _register() -> None:
    """Register the prefix attention (and SDPA's mask) under `IMPLEMENTATION`, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, prefix_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """SDPA attention of `query` (batch, heads, T, dim) over the module's prefix keys and
    values followed by `key` / `value` (batch, kv_heads, S, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _probed is not None:
        _probed.setdefault(id(module), (key.detach(), value.detach()))
    source: Callable[[], Tensor] | None = module.__dict__.get(_SOURCE)
    if source is not None:
        prefix = source().to(key.dtype)
        batch, length = key.shape[0], prefix.shape[2]
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        attention_mask = _grown_mask(
            attention_mask, query.shape[2], key.shape[2], length, bool(causal), key.device
        )
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5's relative bias (and mask): none on the prefix
            kwargs["position_bias"] = torch.cat(
                (bias.new_zeros((*bias.shape[:-1], length)), bias), dim=-1
            )
        key = torch.cat((prefix[0].unsqueeze(0).expand(batch, -1, -1, -1), key), dim=2)
        value = torch.cat((prefix[1].unsqueeze(0).expand(batch, -1, -1, -1), value), dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _grown_mask(
    mask: Tensor | None, queries: int, keys: int, length: int, causal: bool, device: Any
) -> Tensor:
    """The attention mask (…, queries, keys) with `length` visible prefix positions in front;
    without a mask, the one the attention would have used (causal: the last `queries` rows of
    a lower triangle)."""
    if mask is None:
        full = torch.ones(queries, keys, dtype=torch.bool, device=device)
        mask = (full.tril(keys - queries) if causal and queries > 1 else full)[None, None]
    if mask.dtype == torch.bool:
        visible = mask.new_ones((*mask.shape[:-1], length))
    else:  # additive: 0 where visible
        visible = mask.new_zeros((*mask.shape[:-1], length))
    return torch.cat((visible, mask), dim=-1)
