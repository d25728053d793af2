"""Which weight matrices of a model a user means: groups (`FFN_1`, `attention`, ...) and regexes.

This module knows `transformers` and `torch.nn`, not files: callers pass the set of tensor names
the checkpoint files hold (`file_keys`). Module types come from the `ModelLayout` of a model
built on the `meta` device from its config (models/layout.py), so nothing is loaded or
allocated; functions take the layout or the model itself.

Names. A `Target` is named as in the checkpoint files (its weight key minus ".weight"). When the
files were saved from the base model (no `base_model_prefix.` in the keys) while the model class
has the prefix, or the other way round, names are mapped by adding or stripping that prefix.

Groups are per-architecture tables of regexes that must FULLY match a module name relative to
the base model (the name with `base_model_prefix.` stripped); there is no substring guessing.
`target_modules` / `exclude_modules` regexes fully match the file-namespace name.

Tied weights. A weight tied to another one (GPT-2 `lm_head` to `transformer.wte`, T5 and BART
`encoder/decoder.embed_tokens` and `lm_head` to `shared`, ...) is absent from the files; it is not
a target of its own but a name in the `tied_keys` of the target that the files do hold. Group and
regex matching see those tied names too: the `lm_head` group of a model whose head is tied
resolves to the word-embedding target, since it is the same matrix. Where the files hold both
names as separate tensors (e.g. flan-T5's `lm_head.weight`, although transformers v5's T5Config
always says `tie_word_embeddings=True`), the files win: each tensor is its own target.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from torch import nn

from mposurgeon.errors import UsageError
from mposurgeon.models.layout import ModelLayout, as_layout, file_key_mapper
from mposurgeon.models.orientation import Kind, matrix_dims

GROUPS: tuple[str, ...] = ("FFN_1", "FFN_2", "attention", "embeddings", "pooler", "lm_head")

Projection = Literal["q", "k", "v", "o", "qkv"]

# --------------------------------------------------------------------------------------------
# Tables. Every regex fully matches a module name relative to the base model, i.e. without the
# `base_model_prefix.` (`bert.`, `model.`, `transformer.`, ...). Add an architecture by adding
# an entry to ATTENTION_PROJECTIONS and to GROUP_PATTERNS (attention is derived from the former).
# --------------------------------------------------------------------------------------------

_BERT_LAYER = r"encoder\.layer\.\d+\."
_ALBERT_LAYER = r"encoder\.albert_layer_groups\.\d+\.albert_layers\.\d+\."
_DISTILBERT_LAYER = r"transformer\.layer\.\d+\."
_BART_LAYER = r"(?:encoder|decoder)\.layers\.\d+\."
_BART_ATTN = _BART_LAYER + r"(?:self_attn|encoder_attn)\."
_T5_LAYER = r"(?:encoder|decoder)\.block\.\d+\.layer\.\d+\."
_T5_ATTN = _T5_LAYER + r"(?:SelfAttention|EncDecAttention)\."
_GPT2_ATTN = r"h\.\d+\.(?:attn|crossattention)\."
_LLAMA_LAYER = r"layers\.\d+\."

# model_type -> projection -> regexes. "qkv" is a fused query/key/value matrix.
ATTENTION_PROJECTIONS: dict[str, dict[Projection, tuple[str, ...]]] = {
    "bert": {
        "q": (_BERT_LAYER + r"(?:attention|crossattention)\.self\.query",),
        "k": (_BERT_LAYER + r"(?:attention|crossattention)\.self\.key",),
        "v": (_BERT_LAYER + r"(?:attention|crossattention)\.self\.value",),
        "o": (_BERT_LAYER + r"(?:attention|crossattention)\.output\.dense",),
    },
    "albert": {
        "q": (_ALBERT_LAYER + r"attention\.query",),
        "k": (_ALBERT_LAYER + r"attention\.key",),
        "v": (_ALBERT_LAYER + r"attention\.value",),
        "o": (_ALBERT_LAYER + r"attention\.dense",),
    },
    "distilbert": {
        "q": (_DISTILBERT_LAYER + r"attention\.q_lin",),
        "k": (_DISTILBERT_LAYER + r"attention\.k_lin",),
        "v": (_DISTILBERT_LAYER + r"attention\.v_lin",),
        "o": (_DISTILBERT_LAYER + r"attention\.out_lin",),
    },
    "bart": {
        "q": (_BART_ATTN + r"q_proj",),
        "k": (_BART_ATTN + r"k_proj",),
        "v": (_BART_ATTN + r"v_proj",),
        "o": (_BART_ATTN + r"out_proj",),
    },
    "t5": {
        "q": (_T5_ATTN + r"q",),
        "k": (_T5_ATTN + r"k",),
        "v": (_T5_ATTN + r"v",),
        "o": (_T5_ATTN + r"o",),
    },
    "gpt2": {
        "q": (_GPT2_ATTN + r"q_attn",),  # cross-attention only
        "qkv": (_GPT2_ATTN + r"c_attn",),  # in cross-attention c_attn is a fused key/value
        "o": (_GPT2_ATTN + r"c_proj",),
    },
    "bloom": {
        "qkv": (r"h\.\d+\.self_attention\.query_key_value",),
        "o": (r"h\.\d+\.self_attention\.dense",),
    },
    "llama": {
        "q": (_LLAMA_LAYER + r"self_attn\.q_proj",),
        "k": (_LLAMA_LAYER + r"self_attn\.k_proj",),
        "v": (_LLAMA_LAYER + r"self_attn\.v_proj",),
        "o": (_LLAMA_LAYER + r"self_attn\.o_proj",),
    },
}
ATTENTION_PROJECTIONS["roberta"] = ATTENTION_PROJECTIONS["bert"]

# model_type -> group -> regexes (the "attention" group is filled in from ATTENTION_PROJECTIONS).
GROUP_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {
        "FFN_1": (_BERT_LAYER + r"intermediate\.dense",),
        "FFN_2": (_BERT_LAYER + r"output\.dense",),  # never attention.output.dense
        "embeddings": (r"embeddings\.word_embeddings",),
        "pooler": (r"pooler\.dense",),
        "lm_head": (r"cls\.predictions\.decoder",),
    },
    "roberta": {
        "FFN_1": (_BERT_LAYER + r"intermediate\.dense",),
        "FFN_2": (_BERT_LAYER + r"output\.dense",),
        "embeddings": (r"embeddings\.word_embeddings",),
        "pooler": (r"pooler\.dense",),
        "lm_head": (r"lm_head\.decoder",),
    },
    "albert": {
        "FFN_1": (_ALBERT_LAYER + r"ffn",),
        "FFN_2": (_ALBERT_LAYER + r"ffn_output",),
        "embeddings": (r"embeddings\.word_embeddings",),
        "pooler": (r"pooler",),
        "lm_head": (r"predictions\.decoder",),
    },
    "distilbert": {
        "FFN_1": (_DISTILBERT_LAYER + r"ffn\.lin1",),
        "FFN_2": (_DISTILBERT_LAYER + r"ffn\.lin2",),
        "embeddings": (r"embeddings\.word_embeddings",),
        "pooler": (),
        "lm_head": (r"vocab_projector",),
    },
    "bart": {
        "FFN_1": (_BART_LAYER + r"fc1",),
        "FFN_2": (_BART_LAYER + r"fc2",),
        "embeddings": (r"shared", r"(?:encoder|decoder)\.embed_tokens"),
        "pooler": (),
        "lm_head": (r"lm_head",),
    },
    "t5": {
        "FFN_1": (_T5_LAYER + r"DenseReluDense\.wi(?:_0|_1)?",),
        "FFN_2": (_T5_LAYER + r"DenseReluDense\.wo",),
        "embeddings": (r"shared", r"(?:encoder|decoder)\.embed_tokens"),
        "pooler": (),
        "lm_head": (r"lm_head",),
    },
    "gpt2": {
        "FFN_1": (r"h\.\d+\.mlp\.c_fc",),
        "FFN_2": (r"h\.\d+\.mlp\.c_proj",),
        "embeddings": (r"wte",),
        "pooler": (),
        "lm_head": (r"lm_head",),
    },
    "bloom": {
        "FFN_1": (r"h\.\d+\.mlp\.dense_h_to_4h",),
        "FFN_2": (r"h\.\d+\.mlp\.dense_4h_to_h",),
        "embeddings": (r"word_embeddings",),
        "pooler": (),
        "lm_head": (r"lm_head",),
    },
    "llama": {
        "FFN_1": (_LLAMA_LAYER + r"mlp\.gate_proj", _LLAMA_LAYER + r"mlp\.up_proj"),
        "FFN_2": (_LLAMA_LAYER + r"mlp\.down_proj",),
        "embeddings": (r"embed_tokens",),
        "pooler": (),
        "lm_head": (r"lm_head",),
    },
}
for _type, _table in GROUP_PATTERNS.items():
    _table["attention"] = tuple(p for ps in ATTENTION_PROJECTIONS[_type].values() for p in ps)
del _type, _table

# Model types whose module names are those of a supported one.
MODEL_TYPE_ALIASES: dict[str, str] = {
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "mbart": "bart",
    "mt5": "t5",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
}

_MAX_LISTED = 15


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One weight matrix of a checkpoint that a stage may transform.

    `shape` is as stored (Linear (out, in), GPT-2 Conv1D (in, out), Embedding (vocab, hidden));
    `out_dim`/`in_dim` are those of the (out, in) matrix view (vocab, hidden for an embedding).
    `tied_keys` are the tensor names tied to this weight that the files do not hold.
    """

    name: str
    group: str | None
    kind: Kind
    weight_key: str
    shape: tuple[int, int]
    out_dim: int
    in_dim: int
    bias_key: str | None
    tied_keys: tuple[str, ...] = ()

    @property
    def aliases(self) -> tuple[str, ...]:
        """The module names of this matrix: its own, then those of the modules tied to it."""
        tied = tuple(k.removesuffix(".weight") for k in self.tied_keys)
        return (self.name, *tied)


def candidate_modules(model: nn.Module | ModelLayout, file_keys: Collection[str]) -> list[Target]:
    """Every Linear, Conv1D and Embedding whose 2-D weight the files hold, in module order.

    A module whose weight is tied to a weight in the files is not listed; its tensor name is in
    the `tied_keys` of the Target of the weight the files hold.
    """
    layout = as_layout(model)
    keys = set(file_keys)
    to_file = file_key_mapper(layout, keys)
    ties = _TieClasses(layout)
    targets: list[Target] = []
    seen: set[str] = set()
    for module in layout.modules:
        weight_key = to_file(_join(module.name, "weight"))
        if weight_key not in keys or weight_key in seen:
            continue
        seen.add(weight_key)
        tied = ties.tied_away(_join(module.name, "weight"), keys, to_file)
        shape = module.shape
        out_dim, in_dim = matrix_dims(shape, module.kind)
        bias_key = None
        if module.has_bias:
            bias_key = ties.file_key(_join(module.name, "bias"), keys, to_file)
        targets.append(
            Target(
                name=weight_key.removesuffix(".weight"),
                group=None,
                kind=module.kind,
                weight_key=weight_key,
                shape=shape,
                out_dim=out_dim,
                in_dim=in_dim,
                bias_key=bias_key,
                tied_keys=tied,
            )
        )
    return targets


def select_targets(
    model: nn.Module | ModelLayout,
    file_keys: Collection[str],
    *,
    layers: Sequence[str] | str | None = None,
    target_modules: str | None = None,
    exclude_modules: str | None = None,
) -> list[Target]:
    """The union of the groups `layers` and the `target_modules` regex, minus `exclude_modules`.

    Regexes fully match module names as the files hold them, or the name of a module tied to
    them. Raises `UsageError` for an unknown group, a group that matches nothing in this model,
    an invalid regex or an empty selection. Returns Targets in module order, each once, with
    `group` set to the first requested group (in `GROUPS` order) that matched it, or None for
    a Target selected only by `target_modules`.
    """
    requested = _parse_groups(layers)
    include = _compile(target_modules, "target_modules")
    exclude = _compile(exclude_modules, "exclude_modules")
    if not requested and include is None:
        raise UsageError(
            "nothing to select: give groups (layers) or a target_modules regex",
            hint=f"groups: {', '.join(GROUPS)}",
        )
    layout = as_layout(model)
    candidates = candidate_modules(layout, file_keys)
    model_type = _model_type(layout)
    prefix = layout.prefix
    if requested and model_type is None:
        raise UsageError(
            f"no weight-group table for model type {layout.model_type!r} "
            f"({layout.class_name}); modules with weights: {_compact(candidates)}",
            hint="select modules with target_modules (a regex matching whole module names)",
        )

    chosen: dict[str, Target] = {}
    for group in requested:
        assert model_type is not None
        matched = [t for t in candidates if _in_group(model_type, group, t, prefix)]
        if not matched:
            raise UsageError(
                f"group {group!r} matches no module of this {layout.class_name}; "
                f"modules with weights: {_compact(candidates)}",
                hint="choose other groups, or give target_modules (a regex of whole names)",
            )
        for target in matched:
            chosen.setdefault(target.weight_key, dataclasses.replace(target, group=group))
    if include is not None:
        for target in candidates:
            if target.weight_key not in chosen and _matches(include, target):
                chosen[target.weight_key] = target

    selected = [
        chosen[t.weight_key]
        for t in candidates
        if t.weight_key in chosen and not (exclude is not None and _matches(exclude, t))
    ]
    if not selected:
        what = []
        if requested:
            what.append(f"groups {','.join(requested)}")
        if include is not None:
            what.append(f"target_modules {target_modules!r}")
        excluded = f" minus exclude_modules {exclude_modules!r}" if exclude is not None else ""
        raise UsageError(
            f"{' and '.join(what)}{excluded} select no module of this {layout.class_name}; "
            f"modules with weights: {_compact(candidates)}",
            hint="regexes must match whole module names (re.fullmatch), e.g. '.*\\.dense'",
        )
    return selected


def group_of(model: nn.Module | ModelLayout, name: str) -> str | None:
    """The group (first in `GROUPS` order) whose patterns match module `name`, else None.

    `name` may be as the files hold it or as the model names it (with or without the prefix).
    """
    model_type = _model_type(model)
    if model_type is None:
        return None
    relative = _relative(name.removesuffix(".weight"), _prefix(model))
    for group in GROUPS:
        if any(_regex(p).fullmatch(relative) for p in GROUP_PATTERNS[model_type][group]):
            return group
    return None


def attention_projection(model_type: str, name: str) -> Projection | None:
    """Which attention projection module `name` is: "q", "k", "v", "o", fused "qkv", or None.

    `name` is relative to the base model or carries one leading `base_model_prefix.` component.
    """
    table = ATTENTION_PROJECTIONS.get(MODEL_TYPE_ALIASES.get(model_type, model_type))
    if table is None:
        return None
    name = name.removesuffix(".weight")
    forms = [name] + ([name.split(".", 1)[1]] if "." in name else [])
    for projection, patterns in table.items():
        if any(_regex(p).fullmatch(form) for p in patterns for form in forms):
            return projection
    return None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _model_type(model: nn.Module | ModelLayout) -> str | None:
    """The key of GROUP_PATTERNS for this model, or None if it has no table."""
    if isinstance(model, ModelLayout):
        model_type = model.model_type
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    return model_type if model_type in GROUP_PATTERNS else None


def _prefix(model: nn.Module | ModelLayout) -> str:
    if isinstance(model, ModelLayout):
        return model.prefix
    return getattr(model, "base_model_prefix", "") or ""


def _relative(name: str, prefix: str) -> str:
    """`name` without a leading `prefix.`: the name relative to the base model."""
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


class _TieClasses:
    """Parameter names that are one tensor (a layout's tie classes), and which the files hold."""

    def __init__(self, layout: ModelLayout) -> None:
        self._sources = set(layout.tie_sources)
        self._members = {name: list(c) for c in layout.tie_classes for name in c}

    def members(self, name: str) -> list[str]:
        """All names of the tensor `name` is (itself included), in model order."""
        return self._members.get(name, [name])

    def _holder(self, name: str, keys: set[str], to_file: Callable[[str], str]) -> str | None:
        """The member of `name`'s class whose tensor the files hold (a declared source first)."""
        present = [m for m in self.members(name) if to_file(m) in keys]
        present.sort(key=lambda m: m not in self._sources)
        return present[0] if present else None

    def file_key(self, name: str, keys: set[str], to_file: Callable[[str], str]) -> str | None:
        """The file key holding parameter `name` (its own, else that of a tied name)."""
        if to_file(name) in keys:
            return to_file(name)
        holder = self._holder(name, keys, to_file)
        return to_file(holder) if holder is not None else None

    def tied_away(
        self, name: str, keys: set[str], to_file: Callable[[str], str]
    ) -> tuple[str, ...]:
        """File-namespace names tied to `name` and absent from the files, if `name` holds them."""
        if self._holder(name, keys, to_file) != name:
            return ()
        return tuple(to_file(m) for m in self.members(name) if to_file(m) not in keys)


def _parse_groups(layers: Sequence[str] | str | None) -> list[str]:
    """Canonical group names (case-insensitive, comma lists allowed), in `GROUPS` order."""
    if layers is None:
        return []
    items = [layers] if isinstance(layers, str) else list(layers)
    names = [part.strip() for item in items for part in item.split(",") if part.strip()]
    canonical = {g.lower(): g for g in GROUPS}
    unknown = [n for n in names if n.lower() not in canonical]
    if unknown:
        raise UsageError(
            f"unknown group {unknown[0]!r}; groups are {', '.join(GROUPS)}",
            hint="or select modules with target_modules (a regex matching whole module names)",
        )
    wanted = {canonical[n.lower()] for n in names}
    return [g for g in GROUPS if g in wanted]


def _compile(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UsageError(
            f"invalid {option} regex {pattern!r}: {err}",
            hint="a Python regular expression that matches whole module names",
        ) from err


def _matches(regex: re.Pattern[str], target: Target) -> bool:
    return any(regex.fullmatch(name) for name in target.aliases)


def _in_group(model_type: str, group: str, target: Target, prefix: str) -> bool:
    patterns = GROUP_PATTERNS[model_type][group]
    return any(
        _regex(p).fullmatch(_relative(name, prefix)) for name in target.aliases for p in patterns
    )


def _compact(targets: Iterable[Target]) -> str:
    """Module names with layer indices collapsed to `*`, deduplicated, at most _MAX_LISTED."""
    seen: dict[str, None] = {}
    for target in targets:
        seen.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", target.name))
    names = list(seen)
    if not names:
        return "(none)"
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown
