"""Factorized layers: ordinary `nn.Module`s whose weight is an MPO.

`MPOLinear` replaces `nn.Linear` (and GPT-2's `Conv1D`, whose stored weight is the transpose);
`MPOEmbedding` replaces `nn.Embedding`. Both keep their cores in a child module `mpo` whose
parameters are named `core.0 ... core.{n-1}`, so a layer at `M` has state-dict keys
`M.mpo.core.k`, exactly the artifact's tensor names.

Forward picks, per call, the cheaper of two exact evaluations by multiply-add count:
reconstruct the dense weight from the cores, or contract the input through the cores. Inside
`reuse_dense_weights(model)` and without gradients (e.g. evaluating between training steps),
each dense weight is rebuilt once and reused until a core changes.

A pruned module keeps its zeros through training (`MPOCores.keep_zeros`): the matrix is rebuilt
with the pruned entries set to zero, and forward always reconstructs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mposurgeon.mpo.contract import (
    apply_mpo,
    contract_flops,
    mpo_rows,
    reconstruct_flops,
    rows_flops,
    to_matrix,
)
from mposurgeon.mpo.shapes import MPOShape

ForwardMode = Literal["auto", "reconstruct", "contract"]


class MPOCores(nn.Module):
    """The cores of one MPO, `core.k` of shape (r_{k-1}, I_k, J_k, r_k), and their shape."""

    def __init__(self, cores: Sequence[Tensor], shape: MPOShape) -> None:
        super().__init__()
        self.shape = shape
        self.core = nn.ParameterList(nn.Parameter(c) for c in cores)
        self.reuse_matrix = False  # set by `reuse_dense_weights`
        self._kept: tuple[tuple[tuple[int, int], ...], Tensor] | None = None
        self.pruned: Tensor | None
        self.register_buffer("pruned", None, persistent=False)  # set by `keep_zeros`

    @property
    def cores(self) -> list[Tensor]:
        return list(self.core)

    @property
    def central_index(self) -> int:
        return self.shape.central_index

    @property
    def reuses_matrix(self) -> bool:
        """Whether `matrix()` now returns a kept copy (reuse on, gradients off)."""
        return self.reuse_matrix and not torch.is_grad_enabled()

    def keep_zeros(self, pruned: Tensor) -> None:
        """From now on, `matrix()` is zero where `pruned` (bool, (out_dim, in_dim)) is True,
        whatever the cores hold: a pruned module trained as MPO stays pruned."""
        if tuple(pruned.shape) != (self.shape.out_dim, self.shape.in_dim):
            raise ValueError(f"mask of shape {tuple(pruned.shape)} for a {self.shape} MPO")
        self.pruned = pruned.to(device=self.core[0].device, dtype=torch.bool)

    def matrix(self) -> Tensor:
        """The dense (out_dim, in_dim) matrix the cores represent (pruned entries zero).

        While `reuses_matrix`, it is rebuilt only when a core changed since the last call (in
        place, e.g. an optimizer step, or replaced, e.g. moved to another device).
        """
        if not self.reuses_matrix:
            return self._matrix()
        key = tuple((c.data_ptr(), c._version) for c in self.core)
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self._matrix())
        return self._kept[1]

    def _matrix(self) -> Tensor:
        matrix = to_matrix(self.cores, self.shape)
        return matrix if self.pruned is None else matrix.masked_fill(self.pruned, 0)


@contextmanager
def reuse_dense_weights(model: nn.Module) -> Iterator[None]:
    """Inside, MPO layers run without gradients rebuild each dense weight once and reuse it
    (over the batches of an evaluation, say); the copies are dropped on exit. Costs the dense
    weights' memory while active; calls with gradients are not affected."""
    held = [m for m in model.modules() if isinstance(m, MPOCores)]
    for cores in held:
        cores.reuse_matrix = True
    try:
        yield
    finally:
        for cores in held:
            cores.reuse_matrix = False
            cores._kept = None


class MPOLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) held as MPO cores."""

    def __init__(
        self,
        mpo: MPOCores,
        bias: Tensor | None = None,
        forward_mode: ForwardMode = "auto",
    ) -> None:
        super().__init__()
        self.mpo = mpo
        self.in_features = mpo.shape.in_dim
        self.out_features = mpo.shape.out_dim
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.forward_mode: ForwardMode = forward_mode

    @property
    def weight(self) -> Tensor:
        """The dense (out_features, in_features) weight, rebuilt on access.

        For model code that reads `layer.weight` (T5 checks its dtype); forward never uses it.
        """
        return self.mpo.matrix()

    def chosen_mode(self, batch: int) -> Literal["reconstruct", "contract"]:
        """The evaluation this layer uses for `batch` input rows."""
        if self.mpo.pruned is not None:
            return "reconstruct"  # the cores alone would fill the pruned entries
        if self.forward_mode != "auto":
            return self.forward_mode
        if self.mpo.reuses_matrix:
            return "reconstruct"  # rebuilt once, reused: the dense product alone
        cores = self.mpo.cores
        dense = reconstruct_flops(cores) + batch * self.out_features * self.in_features
        return "contract" if contract_flops(cores, batch) < dense else "reconstruct"

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype (cores of another dtype,
        float64 say, compute in theirs and the result is cast)."""
        batch = x.numel() // self.in_features if self.in_features else 0
        if self.chosen_mode(batch) == "reconstruct":
            weight = self.mpo.matrix()
            bias = self.bias
            if weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
                bias = bias.to(x.dtype) if bias is not None else None
            return F.linear(x, weight, bias)
        dtype = self.mpo.cores[0].dtype
        y = apply_mpo(x.to(dtype), self.mpo.cores, self.mpo.shape).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        s = self.mpo.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"modes={list(s.out_modes)}x{list(s.in_modes)}, bias={self.bias is not None}"
        )


class MPOEmbedding(nn.Module):
    """Row lookup in an MPO-held (num_embeddings, embedding_dim) table, times `embed_scale`.

    `embed_scale` carries the factor of scaled word embeddings (BART's `BartScaledWordEmbedding`).
    """

    def __init__(
        self,
        mpo: MPOCores,
        padding_idx: int | None = None,
        forward_mode: ForwardMode = "auto",
        embed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.mpo = mpo
        self.num_embeddings = mpo.shape.out_dim
        self.embedding_dim = mpo.shape.in_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.forward_mode: ForwardMode = forward_mode

    @property
    def weight(self) -> Tensor:
        """The dense table (rebuilt on access; for code that reads `embedding.weight`)."""
        return self.mpo.matrix()

    def chosen_mode(self, num_rows: int) -> Literal["reconstruct", "contract"]:
        if self.mpo.pruned is not None:
            return "reconstruct"
        if self.forward_mode != "auto":
            return self.forward_mode
        if self.mpo.reuses_matrix:
            return "reconstruct"
        cores = self.mpo.cores
        return (
            "contract" if rows_flops(cores, num_rows) < reconstruct_flops(cores) else "reconstruct"
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.chosen_mode(input_ids.numel()) == "reconstruct":
            rows = F.embedding(input_ids, self.mpo.matrix(), self.padding_idx)
        else:
            rows = mpo_rows(input_ids, self.mpo.cores, self.mpo.shape)
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows

    def extra_repr(self) -> str:
        s = self.mpo.shape
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"modes={list(s.out_modes)}x{list(s.in_modes)}"
        )
