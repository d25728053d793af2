"""What target selection needs to know of a model class, as plain data: `ModelLayout`.

A layout is read off a model built on the `meta` device from its config (nothing allocated):
the class name, `model_type`, `base_model_prefix`, every parameter name in model order, every
Linear / Conv1D / Embedding with a 2-D weight, and which parameter names are one tensor (shared
objects or declared ties). It is plain data, so a caller may keep it (`to_dict`/`from_dict`) and
skip building the model, and with it importing the `transformers` modeling stack, next time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mposurgeon.errors import ArtifactError, UsageError, one_line
from mposurgeon.models.orientation import KINDS, Kind

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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
            if any(m.kind not in KINDS for m in modules):
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


CONFIG_NAME = "config.json"
CONFIG_HINT = "restore the config.json saved with these weights"


class _TooLarge(Exception):
    """Raised from a parameter registration hook: the model outgrew its bound."""


@contextmanager
def _parameter_bound(limit: int | None) -> Iterator[None]:
    """Raise _TooLarge once more than `limit` parameters have been registered in any module
    while the body runs (a meta model of a huge config is cheap in memory, not in time)."""
    if limit is None:
        yield
        return
    count = 0

    def hook(module: nn.Module, name: str, param: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooLarge

    handle = nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def parameter_bound(num_tensors: int) -> int:
    """The most parameters a model built from a config may register over files holding
    `num_tensors` tensors: ties, heads absent from the files and the like stay far below."""
    return 4 * num_tensors + 1024


def build_meta_model(
    config: PretrainedConfig, file_keys: Collection[str] | None = None
) -> nn.Module:
    """The model of `config.architectures[0]` (else `AutoModel`), built without allocating.

    With `file_keys` (the tensor names of the checkpoint the config came with), a config that
    describes a far larger model than those tensors (e.g. a million layers) is refused while
    the model is being built, within a fraction of a second.
    """
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    limit = parameter_bound(len(file_keys)) if file_keys is not None else None
    try:
        with torch.device("meta"), _parameter_bound(limit):
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
    except _TooLarge:
        assert file_keys is not None and limit is not None
        raise ArtifactError(
            f"{CONFIG_NAME} describes a far larger model than its weights: over {limit:,} "
            f"parameters for {len(file_keys):,} tensors{_suspects(config, file_keys)}",
            hint=CONFIG_HINT,
        ) from None
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as err:  # a config transformers accepted but cannot build a model from
        raise ArtifactError(
            f"{CONFIG_NAME} describes no model transformers can build "
            f"({type(err).__name__}: {one_line(err)})",
            hint=CONFIG_HINT,
        ) from err
    return model.eval()


def _suspects(config: PretrainedConfig, file_keys: Collection[str]) -> str:
    """`(num_hidden_layers=1000000 ...)`: the config's layer counts above what the files hold."""
    held = max((int(p) + 1 for k in file_keys for p in k.split(".") if p.isdigit()), default=0)
    fields = [
        f"{key}={value}"
        for key, value in config.to_dict().items()
        if "layer" in key
        and isinstance(value, int)
        and not isinstance(value, bool)
        and value > held
    ]
    return f" ({', '.join(fields)}; the weights hold {held} layers)" if fields else ""


def file_key_mapper(layout: ModelLayout, keys: Collection[str]) -> Callable[[str], str]:
    """Map model parameter names to file keys: as is, or with `base_model_prefix.` stripped or
    added, whichever finds the most parameters in the files (as is wins ties)."""
    prefix = layout.prefix
    if not prefix:
        return lambda n: n
    dotted = prefix + "."

    def same(n: str) -> str:
        return n

    def strip(n: str) -> str:
        return n[len(dotted) :] if n.startswith(dotted) else n

    def add(n: str) -> str:
        return n if n.startswith(dotted) else dotted + n

    names = layout.parameters
    return max((same, strip, add), key=lambda f: sum(f(n) in keys for n in names))


def check_layout_files(layout: ModelLayout, shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuse a config that disagrees with the weights it came with: `shapes` maps every
    tensor name of the files (an MPO module's weight key with its dense shape) to its shape.

    Every Linear / Conv1D / Embedding weight the files hold must have the shape the config
    gives it, and the numbered blocks (`encoder.layer.N`, `h.N`, ...) of the model and of the
    files must be the same: a config of 3 layers over weights of 2 (or 1 over 2) is refused.
    """
    to_file = file_key_mapper(layout, shapes)
    for module in layout.modules:
        key = to_file(f"{module.name}.weight" if module.name else "weight")
        if key in shapes and tuple(shapes[key]) != module.shape:
            stored = "x".join(map(str, shapes[key]))
            raise ArtifactError(
                f"{CONFIG_NAME} does not match the weights: it makes {key} "
                f"{module.shape[0]}x{module.shape[1]}, the files hold {stored}",
                hint=CONFIG_HINT,
            )
    model_blocks = {to_file(b) for p in layout.parameters for b in _blocks(p)}
    file_blocks = {b for key in shapes for b in _blocks(key)}
    parents = {b.rpartition(".")[0] for b in model_blocks}
    missing = sorted(model_blocks - file_blocks, key=_natural)
    extra = sorted(
        (b for b in file_blocks - model_blocks if b.rpartition(".")[0] in parents), key=_natural
    )
    if missing:
        raise ArtifactError(
            f"{CONFIG_NAME} does not match the weights: it describes {missing[0]}, which the "
            f"files do not hold{_more(missing)}",
            hint=CONFIG_HINT,
        )
    if extra:
        raise ArtifactError(
            f"{CONFIG_NAME} does not match the weights: the files hold {extra[0]}, which it does "
            f"not describe{_more(extra)}",
            hint=CONFIG_HINT,
        )


def _blocks(name: str) -> Iterator[str]:
    """The numbered blocks a dotted name lies in: `a.0.b.1.c` -> `a.0`, `a.0.b.1`."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            yield ".".join(parts[: i + 1])


def _natural(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of a module whose weight can be factorized (an Embedding, a Linear or a
    `transformers` Conv1D); None for any other module."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def describe_model(model: nn.Module) -> ModelLayout:
    """The layout of `model` (usually a meta-device model from `build_meta_model`)."""
    modules: list[ModuleInfo] = []
    for name, module in model.named_modules(remove_duplicate=False):
        kind = kind_of(module)
        if kind is None:
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
