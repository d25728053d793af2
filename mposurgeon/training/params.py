"""Counting a live model's parameters and writing it without tied duplicates.

Parameters are named as `model.named_parameters()` names them (live names); tied parameters
count once. Which parameters train is each method's business (`methods/`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from mposurgeon.methods.base import head_parameter_names


@dataclass(frozen=True)
class ParamCount:
    """Unique parameters (elements) of a model and how many of them train."""

    trainable: int
    total: int
    trainable_head: int = 0  # the task head's share of `trainable`

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter elements, each tied tensor counted once, and the
    trainable elements of the task head (`methods.base.head_parameter_names`)."""
    params = list(model.parameters())  # deduplicated by identity
    head = head_parameter_names(model)
    return ParamCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        trainable_head=sum(
            p.numel() for n, p in model.named_parameters() if n in head and p.requires_grad
        ),
    )


def unique_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict without tied duplicates: ({name: tensor}, {dropped alias: kept name}).

    Tensors sharing storage (tied embeddings, the cores of tied MPO layers) are kept under the
    first name in state-dict order.
    """
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in owner:
            aliases[name] = owner[key]
            continue
        owner[key] = name
        kept[name] = tensor
    return kept, aliases
