"""What target selection needs to know of a model class, as plain data: `ModelLayout`.

A layout is read off a model built on the `meta` device from its config (nothing allocated):
the class name, `model_type`, `base_model_prefix`, every parameter name in model order, every
Linear / Conv1D / Embedding with a 2-D weight, and which parameter names are one tensor (shared
objects or declared ties). It is plain data, so a caller may keep it (`to_dict`/`from_dict`) and
skip building the model, and with it importing the `transformers` modeling stack, next time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mposurgeon.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Kind = Literal["linear", "conv1d", "embedding"]

#: Version of the `to_dict` form; bump it when the fields or their meaning change.
LAYOUT_FORMAT = 1


@dataclass(frozen=True)
class ModuleInfo:
    """One Linear, Conv1D or Embedding of a model, named as the model names it.

    `shape` is the weight's as stored (Linear (out, in), Conv1D (in, out), Embedding (vocab,
    hidden)); `has_bias` says whether the module has a bias tensor.
    """

    name: str
    kind: Kind
    shape: tuple[int, int]
    has_bias: bool


@dataclass(frozen=True)
class ModelLayout:
    """The module layout of one model class built from one config.

    `modules` lists every path of `named_modules(remove_duplicate=False)` that is a Linear,
    Conv1D or Embedding with a 2-D weight, in model order (a shared module once per path).
    `tie_classes` are the groups (two or more names, model order) of parameter names that are
    one tensor; `tie_sources` the names that declared ties point to.
    """

    class_name: str
    model_type: str | None
    prefix: str
    parameters: tuple[str, ...]
    modules: tuple[ModuleInfo, ...]
    tie_classes: tuple[tuple[str, ...], ...] = ()
    tie_sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (with `format`), read back by `from_dict`."""
        return {
            "format": LAYOUT_FORMAT,
            "class_name": self.class_name,
            "model_type": self.model_type,
            "prefix": self.prefix,
            "parameters": list(self.parameters),
            "modules": [[m.name, m.kind, list(m.shape), m.has_bias] for m in self.modules],
            "tie_classes": [list(c) for c in self.tie_classes],
            "tie_sources": list(self.tie_sources),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelLayout:
        """The layout of `to_dict`; raises ValueError for another format or a malformed dict."""
        if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"not a model layout of format {LAYOUT_FORMAT}")
        try:
            modules = tuple(
                ModuleInfo(str(name), kind, (int(shape[0]), int(shape[1])), bool(bias))
                for name, kind, shape, bias in data["modules"]
            )
            if any(m.kind not in ("linear", "conv1d", "embedding") for m in modules):
                raise ValueError("unknown module kind")
            return cls(
                class_name=str(data["class_name"]),
                model_type=None if data["model_type"] is None else str(data["model_type"]),
                prefix=str(data["prefix"]),
                parameters=tuple(str(p) for p in data["parameters"]),
                modules=modules,
                tie_classes=tuple(tuple(str(n) for n in c) for c in data["tie_classes"]),
                tie_sources=tuple(str(s) for s in data["tie_sources"]),
            )
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"malformed model layout: {err}") from err


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of `config.architectures[0]` (else `AutoModel`), built without allocating."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel):
            model = model_cls(config)
        else:
            try:
                model = transformers.AutoModel.from_config(config)
            except ValueError as err:
                raise UsageError(
                    f"transformers has no model class for architecture {arch!r} "
                    f"(model type {config.model_type!r})",
                    hint="upgrade transformers, or check config.json",
                ) from err
    return model.eval()


def describe_model(model: nn.Module) -> ModelLayout:
    """The layout of `model` (usually a meta-device model from `build_meta_model`)."""
    conv1d = _conv1d_class()
    modules: list[ModuleInfo] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Embedding):
            kind: Kind = "embedding"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        elif conv1d is not None and isinstance(module, conv1d):
            kind = "conv1d"
        else:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        bias = getattr(module, "bias", None)
        has_bias = kind != "embedding" and isinstance(bias, torch.Tensor)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        modules.append(ModuleInfo(name, kind, shape, has_bias))
    parameters, classes, sources = _tie_classes(model)
    config = getattr(model, "config", None)
    return ModelLayout(
        class_name=type(model).__name__,
        model_type=getattr(config, "model_type", None),
        prefix=getattr(model, "base_model_prefix", "") or "",
        parameters=parameters,
        modules=tuple(modules),
        tie_classes=classes,
        tie_sources=sources,
    )


def as_layout(model: nn.Module | ModelLayout) -> ModelLayout:
    """`model` itself if it is a layout, else its description."""
    return model if isinstance(model, ModelLayout) else describe_model(model)


def _tie_classes(
    model: nn.Module,
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """(parameter names in model order, tie classes of 2+ names, declared tie sources)."""
    order: dict[str, int] = {}
    parent: dict[str, str] = {}

    def find(n: str) -> str:
        while parent.setdefault(n, n) != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    first_of: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        order.setdefault(name, len(order))
        find(name)
        if id(param) in first_of:
            union(name, first_of[id(param)])
        else:
            first_of[id(param)] = name
    sources: list[str] = []
    for target, source in _declared_ties(model).items():
        if target in order and source in order:
            union(target, source)
            if source not in sources:
                sources.append(source)
    members: dict[str, list[str]] = {}
    for name in order:  # insertion order is model order
        members.setdefault(find(name), []).append(name)
    classes = tuple(tuple(m) for m in members.values() if len(m) > 1)
    return tuple(order), classes, tuple(sources)


def _declared_ties(model: nn.Module) -> dict[str, str]:
    """The model's `{target: source}` tied parameter names (transformers v5), else empty.

    transformers v4 ties weights in `post_init`, so shared parameter objects already show them.
    """
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return {}
    try:
        ties = expand(all_submodels=True)
    except (TypeError, ValueError):
        return {}
    return {str(k): str(v) for k, v in (ties or {}).items()}


def _conv1d_class() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D
