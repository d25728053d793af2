"""How each kind of layer stores its weight: the one place that knows GPT-2's Conv1D is
transposed.

A weight matrix W maps in_dim inputs to out_dim outputs. `nn.Linear` and `nn.Embedding` store
it as (out_dim, in_dim); `transformers`' `Conv1D` stores its transpose, (in_dim, out_dim).
Everything that factorizes, merges or scores a matrix works on W, (out_dim, in_dim).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

#: The kinds of layers whose weight can be factorized.
Kind = Literal["linear", "conv1d", "embedding"]
KINDS: tuple[Kind, ...] = ("linear", "conv1d", "embedding")

_Dim = TypeVar("_Dim")


def as_matrix(weight: Tensor, kind: Kind) -> Tensor:
    """The (out_dim, in_dim) matrix of a weight as `kind` stores it (a view, no copy)."""
    return weight.t() if kind == "conv1d" else weight


def as_weight(matrix: Tensor, kind: Kind) -> Tensor:
    """The weight as `kind` stores it, from its (out_dim, in_dim) matrix (a view, no copy)."""
    return matrix.t() if kind == "conv1d" else matrix


def stored_shape(out_dim: _Dim, in_dim: _Dim, kind: Kind) -> tuple[_Dim, _Dim]:
    """The shape `kind` stores an (out_dim, in_dim) matrix in (sizes, or the names of the axes:
    `stored_shape("out_dim", "in_dim", kind)`)."""
    return (in_dim, out_dim) if kind == "conv1d" else (out_dim, in_dim)


def matrix_dims(shape: tuple[int, ...] | list[int], kind: Kind) -> tuple[int, int]:
    """(out_dim, in_dim) of a weight stored with `shape` by `kind`."""
    first, second = int(shape[0]), int(shape[1])
    return (second, first) if kind == "conv1d" else (first, second)
