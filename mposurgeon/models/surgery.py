"""Swap dense modules of a live model for MPO layers.

Module names here are in the checkpoint-file namespace (a weight key minus ".weight"); when the
live model carries its `base_model_prefix` and the files do not (or the other way round), the
name is mapped onto the live model. Tied modules (e.g. GPT-2 `lm_head` tied to `wte`, T5
`encoder.embed_tokens` tied to `shared`) get MPO layers that share the same cores, so they stay
tied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from mposurgeon.models.layers import Fixup, ForwardMode, MPOCores, MPOEmbedding, MPOLinear
from mposurgeon.models.layout import kind_of
from mposurgeon.models.orientation import Kind
from mposurgeon.mpo.shapes import MPOShape


@dataclass
class MPOModuleState:
    """What it takes to rebuild one factorized module: its cores, shape and bias, and the
    rounding fixup of its matrix, if any (`MPOCores` keeps it only if made for these cores)."""

    name: str
    kind: Kind
    shape: MPOShape
    cores: list[Tensor]
    bias: Tensor | None = None
    tied_names: Sequence[str] = field(default_factory=tuple)
    fixup: Fixup | None = None


def module_kind(module: nn.Module) -> Kind:
    """The kind of a dense module whose weight can be factorized; TypeError for another."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a Linear, Conv1D or Embedding")
    return kind


def resolve_module_name(model: nn.Module, name: str) -> str:
    """The live model's name for the file-namespace module `name`."""
    modules = dict(model.named_modules())
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and f"{prefix}.{name}" in modules:
        return f"{prefix}.{name}"
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in modules:
        return name[len(prefix) + 1 :]
    raise KeyError(f"module {name!r} not found in {type(model).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted path `name` and return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old


def _mpo_layer_like(
    old: nn.Module, cores: MPOCores, bias: Tensor | None, forward_mode: ForwardMode
) -> nn.Module:
    """An MPO layer that computes what `old` computed, with the weight in `cores`."""
    if isinstance(old, nn.Embedding):
        # Scaled word embeddings (BART, M2M100, ...) multiply their lookup by `embed_scale`.
        scale = float(getattr(old, "embed_scale", None) or 1.0)
        return MPOEmbedding(
            cores,
            padding_idx=old.padding_idx,
            forward_mode=forward_mode,
            embed_scale=scale,
            dtype=old.weight.dtype,  # rows in the model's dtype, whatever the cores'
        )
    old_bias = getattr(old, "bias", None)
    if bias is None and isinstance(old_bias, Tensor) and old_bias.device.type != "meta":
        bias = old_bias.detach()
    return MPOLinear(cores, bias=bias, forward_mode=forward_mode)


def install_mpo_layers(
    model: nn.Module,
    states: Sequence[MPOModuleState],
    forward_mode: ForwardMode = "auto",
) -> dict[str, nn.Module]:
    """Replace every module named in `states` (and the modules tied to it) by an MPO layer.

    Returns the new layers by live module name. Cores become trainable Parameters.
    """
    installed: dict[str, nn.Module] = {}
    for state in states:
        cores = MPOCores([c.detach().clone() for c in state.cores], state.shape, state.fixup)
        for i, name in enumerate([state.name, *state.tied_names]):
            live = resolve_module_name(model, name)
            old = model.get_submodule(live)
            layer = _mpo_layer_like(old, cores, state.bias if i == 0 else None, forward_mode)
            replace_module(model, live, layer)
            installed[live] = layer
    return installed
