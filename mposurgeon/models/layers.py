"""Factorized layers: ordinary `nn.Module`s whose weight is an MPO.

`MPOLinear` replaces `nn.Linear` (and GPT-2's `Conv1D`, whose stored weight is the transpose);
`MPOEmbedding` replaces `nn.Embedding`. Both keep their cores in a child module `mpo` whose
parameters are named `core.0 ... core.{n-1}`, so a layer at `M` has state-dict keys
`M.mpo.core.k`, exactly the artifact's tensor names.

Forward picks, per call, the cheaper of two exact evaluations by multiply-add count:
reconstruct the dense weight from the cores, or contract the input through the cores. Inside
`reuse_dense_weights(model)` and without gradients (e.g. evaluating between training steps),
each dense weight is rebuilt once and reused until a core changes.

Half-precision cores (float16, bfloat16) are contracted in float32 and the result rounded once
to their dtype, as `merge` does: chaining half-precision products would round at every step
(about twice merge's error for bfloat16 cores). Cores of any dtype give a weight that forward
rounds once more only if the input's dtype differs (float32 cores of a bfloat16 model: the
float32 matrix rounded to bfloat16, exactly the weight merge writes).

A module decomposed from half-precision weights into wider cores may carry a `Fixup`: the few
entries of its matrix that the cores' contraction, rounded once to the weights' dtype, does not
give bitwise (tiny entries below what float32 cores resolve, exact zeros), stored with their
original values. Rebuilding the matrix (and `merge`) rounds and then sets them, so the weight is
bitwise the original. A fixup holds for the cores it was made for only (`Fixup.cores_sha256`):
once they change (training, another stage), it is dropped.

A pruned module keeps its zeros through training (`MPOCores.keep_zeros`): the matrix is rebuilt
with the pruned entries set to zero, and forward always reconstructs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

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

#: Half-precision dtypes: cores of these are contracted in float32 (`compute_dtype`).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype cores of `dtype` are contracted in: float32 for half precision, else `dtype`."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _upcast(cores: Sequence[Tensor]) -> list[Tensor]:
    """The cores in their `compute_dtype` (the same tensors when that is theirs)."""
    return [c.to(compute_dtype(c.dtype)) for c in cores]


# -- rounding fixups ---------------------------------------------------------------------------

#: How far from a rounding boundary, in multiples of the largest |contraction - original| of the
#: matrix, an entry must be for its rounding not to need a fixup. Another contraction of the
#: same cores (float64, another order, thread count or device) differs from this one by at most
#: about the sum of both errors, twice the largest: so a fixup holds for any of them, not just
#: for the one it was made with. (Storing only the entries this contraction rounds wrong, 1 in
#: 20 of what is stored, left 94 of the 4.2M entries of a random 2048x2048 bfloat16 matrix off
#: when the same cores were contracted in float64.) A fixup then holds ~2.5e-3 of the entries,
#: 0.6% of the float32 cores' bytes.
FIXUP_SLACK = 2.0

#: Entries compared per block when looking for a fixup (bounds the temporaries).
_BLOCK = 1 << 20

#: Integer dtypes of each float width: a fixup's values are kept as their bits in a live layer,
#: so that `module.to(dtype)` cannot round them.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def cores_fingerprint(cores: Sequence[Tensor]) -> str:
    """sha256 (hex) of the cores' dtypes, shapes and bytes, in order: what a `Fixup` is valid
    for."""
    digest = hashlib.sha256()
    for core in cores:
        data = core.detach().to("cpu").contiguous()
        digest.update(f"{data.dtype}{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Fixup:
    """Entries to set after rounding an MPO's (out_dim, in_dim) matrix to `value.dtype`:
    `index` (count,) int64 flat (row-major) indices, `value` (count,) the original entries.
    Valid for the cores whose `cores_fingerprint` is `cores_sha256` only."""

    index: Tensor
    value: Tensor
    cores_sha256: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the matrix is rounded to before the entries are set."""
        return self.value.dtype

    def matches(self, cores: Sequence[Tensor]) -> bool:
        """Whether `cores` are bitwise the cores this fixup was made for."""
        return cores_fingerprint(cores) == self.cores_sha256

    def apply(self, matrix: Tensor) -> Tensor:
        """Set the entries in `matrix` ((out_dim, in_dim) in `dtype`, any strides: a
        transposed view writes through), in place; return it."""
        index = self.index.to(matrix.device)
        cols = matrix.shape[1]
        matrix[index // cols, index % cols] = self.value.to(matrix.device)
        return matrix


def _row_blocks(matrix: Tensor, original: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first flat index, matrix entries, original entries) of blocks of whole rows, flat."""
    rows = max(1, _BLOCK // max(matrix.shape[1], 1))
    for r0 in range(0, matrix.shape[0], rows):
        r1 = min(r0 + rows, matrix.shape[0])
        yield r0 * matrix.shape[1], matrix[r0:r1].reshape(-1), original[r0:r1].reshape(-1)


def rounding_fixup(matrix: Tensor, original: Tensor, limit: int) -> Tensor | None:
    """The entries of `matrix` ((out_dim, in_dim), float32 or float64: a contraction of cores)
    that rounding it once to `original`'s dtype (half precision, same shape) may not give
    bitwise: those it does not, and those within `FIXUP_SLACK` times the largest
    |matrix - original| of a rounding boundary (zeros always: their sign). Returns their
    flat row-major indices (int64, (count,), ascending; empty: rounding alone is exact); when
    there are more than `limit`, those it rounds wrong and the ones nearest a boundary, `limit`
    in all; None when it rounds more than `limit` wrong.

    Two passes over blocks of rows: the largest error and how many entries round wrong, then
    the entries rounded wrong or small enough to be near a boundary (|x| <= 8 / eps *
    (largest + margin): only there can half a rounding gap be that small), checked exactly.
    An outlier (one entry far above the rest, whose error sets the margin of them all) can make
    most small entries near; the ones kept are then those this contraction rounds wrong (merge
    gives them back bitwise) and, of the rest, those nearest a boundary (their distance to it,
    less their error, smallest first), so that other contractions of the cores are covered
    where they are likeliest to round otherwise."""
    dtype = original.dtype
    bits = _BITS[original.element_size()]
    magnitude_bits = (1 << (8 * original.element_size() - 1)) - 1  # all but the sign
    largest, missed, wrong = 0.0, [], 0
    for _, m, x in _row_blocks(matrix, original):
        largest = max(largest, float((m - x.to(m.dtype)).abs_().amax()))
        missed.append((m.to(dtype).view(bits) != x.view(bits)).nonzero().squeeze(1))
        wrong += missed[-1].numel()
        if wrong > limit:
            return None
    margin = FIXUP_SLACK * largest
    # candidates by their bits (ordered as the non-negative floats are), the bound rounded up
    small = min(8 / torch.finfo(dtype).eps * (largest + margin), torch.finfo(dtype).max)
    below = int(torch.tensor(small).to(dtype).view(bits)) + 1
    found: list[Tensor] = []  # flat indices
    risks: list[Tensor] = []  # of each: its distance to a boundary less its error; -inf: wrong
    count = 0
    for (start, m, x), miss in zip(_row_blocks(matrix, original), missed, strict=True):
        xb = x.view(bits)
        small_ones = ((xb & magnitude_bits) <= below).nonzero().squeeze(1)
        candidates = torch.cat([small_ones, miss]).unique()
        xc, mc = x[candidates].double(), m[candidates].double()
        magnitude = xb[candidates].to(torch.int64) & magnitude_bits
        up = (magnitude + 1).to(bits).view(dtype).double()
        down = (magnitude - 1).clamp(min=0).to(bits).view(dtype).double()
        half_gap = torch.minimum(up - xc.abs(), xc.abs() - down) / 2  # 0 for zeros
        risk = half_gap - (mc - xc).abs()
        wrong_here = mc.to(dtype).view(bits) != xb[candidates]
        near = (risk <= margin) | wrong_here
        found.append(candidates[near] + start)
        risks.append(risk[near].masked_fill_(wrong_here[near], -math.inf))
        count += found[-1].numel()
        if count > 2 * max(limit, 1):  # keep the riskiest `limit`: bounded memory
            found, risks = _riskiest(found, risks, limit)
            count = found[0].numel()
    if not found:
        return torch.zeros(0, dtype=torch.int64)
    if count > limit:
        found, risks = _riskiest(found, risks, limit)
    return torch.cat(found).sort().values


def _riskiest(
    found: list[Tensor], risks: list[Tensor], limit: int
) -> tuple[list[Tensor], list[Tensor]]:
    """The `limit` entries of `found` (lists of index blocks) with the lowest risk, as one
    block each."""
    index, risk = torch.cat(found), torch.cat(risks)
    keep = torch.topk(risk, min(limit, risk.numel()), largest=False).indices
    return [index[keep]], [risk[keep]]


def rounded_error(matrix: Tensor, original: Tensor) -> float:
    """The relative Frobenius error of `matrix` ((out_dim, in_dim), float32 or float64)
    rounded once to `original`'s dtype, against `original` (same shape)."""
    squares = norm = 0.0
    for _, m, x in _row_blocks(matrix, original):
        xw = x.to(m.dtype)
        diff = m.to(original.dtype).to(m.dtype) - xw
        squares += float(torch.dot(diff.double(), diff.double()))
        norm += float(torch.dot(xw.double(), xw.double()))
    return (squares / norm) ** 0.5 if norm > 0 else float(squares > 0)


class _Replaced(torch.autograd.Function):
    """Forward: `value`; backward: the gradient to `matrix` unchanged (the fixup's rounding
    does not cut the cores' gradients)."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, value: Tensor) -> Tensor:
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class MPOCores(nn.Module):
    """The cores of one MPO, `core.k` of shape (r_{k-1}, I_k, J_k, r_k), and their shape;
    `fixup`, if given and made for these cores, is applied whenever the matrix is rebuilt
    until the cores change."""

    def __init__(
        self, cores: Sequence[Tensor], shape: MPOShape, fixup: Fixup | None = None
    ) -> None:
        super().__init__()
        self.shape = shape
        self.core = nn.ParameterList(nn.Parameter(c) for c in cores)
        self.reuse_matrix = False  # set by `reuse_dense_weights`
        self._round_to: torch.dtype | None = None
        self._kept: tuple[tuple[tuple[int, ...], ...], Tensor] | None = None
        self.pruned: Tensor | None
        self.register_buffer("pruned", None, persistent=False)  # set by `keep_zeros`
        # the fixup: indices and the values' bits as buffers (they follow the module's device,
        # stay out of its state dict, and no dtype conversion rounds them)
        self.fixup_index: Tensor | None
        self.fixup_bits: Tensor | None
        self.register_buffer("fixup_index", None, persistent=False)
        self.register_buffer("fixup_bits", None, persistent=False)
        self._fixup_of: tuple[torch.dtype, str] | None = None  # (values' dtype, cores_sha256)
        self._fixup_checked: tuple[tuple[int, ...], ...] | None = None  # cores' key, matching
        if fixup is not None and fixup.matches(self.cores):
            device = self.core[0].device
            self.fixup_index = fixup.index.to(device)
            self.fixup_bits = fixup.value.view(_BITS[fixup.value.element_size()]).to(device)
            self._fixup_of = (fixup.dtype, fixup.cores_sha256)
            self._fixup_checked = self._key()

    @property
    def cores(self) -> list[Tensor]:
        return list(self.core)

    @property
    def central_index(self) -> int:
        return self.shape.central_index

    @property
    def round_to(self) -> torch.dtype | None:
        """The dtype the rebuilt matrix is rounded through before use (its values then held
        in the cores' dtype): merge's output dtype, set by `merge --verify` so that the
        factorized model evaluates exactly the weights merge writes. None (default): no
        rounding beyond the cores' own. Set, forward always reconstructs."""
        return self._round_to

    @round_to.setter
    def round_to(self, dtype: torch.dtype | None) -> None:
        self._round_to = dtype
        self._kept = None

    @property
    def fixup(self) -> Fixup | None:
        """The fixup applied when the matrix is rebuilt: None if there is none, or once the
        cores are no longer those it was made for (checked by their fingerprint whenever a
        core changed, moved or was replaced since the last check; a mismatch drops it)."""
        if self._fixup_of is None or self.fixup_index is None or self.fixup_bits is None:
            return None
        dtype, digest = self._fixup_of
        fixup = Fixup(self.fixup_index, self.fixup_bits.view(dtype), digest)
        key = self._key()
        if key != self._fixup_checked:
            if not fixup.matches(self.cores):
                self.fixup_index = self.fixup_bits = None
                self._fixup_of = self._fixup_checked = None
                return None
            self._fixup_checked = key
        return fixup

    def _key(self) -> tuple[tuple[int, ...], ...]:
        """What changes when a core is changed in place, moved or replaced."""
        return tuple((id(c), c.data_ptr(), c._version, *c.shape) for c in self.core)

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
        key = self._key()
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self._matrix())
        return self._kept[1]

    def _matrix(self) -> Tensor:
        """(out_dim, in_dim) in the cores' dtype: contracted in their `compute_dtype` and
        rounded once (through `round_to` first, if set). With a `fixup` (and `round_to` unset
        or its dtype), rounded through the fixup's dtype and the fixup applied: bitwise the
        original weight; gradients pass to the cores as if unrounded."""
        matrix = to_matrix(_upcast(self.cores), self.shape)
        fixup = self.fixup
        if fixup is not None and self.round_to in (None, fixup.dtype):
            fixed = fixup.apply(matrix.detach().to(fixup.dtype, copy=True)).to(matrix.dtype)
            matrix = _Replaced.apply(matrix, fixed) if matrix.requires_grad else fixed
        elif self.round_to is not None:
            matrix = matrix.to(self.round_to)
        matrix = matrix.to(self.core[0].dtype)
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
        if self.mpo.round_to is not None:
            return "reconstruct"  # contracting would not round the weight
        if self.forward_mode != "auto":
            return self.forward_mode
        if self.mpo.reuses_matrix:
            return "reconstruct"  # rebuilt once, reused: the dense product alone
        cores = self.mpo.cores
        dense = reconstruct_flops(cores) + batch * self.out_features * self.in_features
        return "contract" if contract_flops(cores, batch) < dense else "reconstruct"

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype. Reconstructing: the
        weight (`MPOCores.matrix`) cast to x's dtype. Contracting: in the cores'
        `compute_dtype` (float32 for half-precision cores, float64 for float64 ones), bias
        included, the result cast to x's dtype."""
        batch = x.numel() // self.in_features if self.in_features else 0
        if self.chosen_mode(batch) == "reconstruct":
            weight = self.mpo.matrix()
            bias = self.bias
            if weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
                bias = bias.to(x.dtype) if bias is not None else None
            return F.linear(x, weight, bias)
        cores = _upcast(self.mpo.cores)
        y = apply_mpo(x.to(cores[0].dtype), cores, self.mpo.shape)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # before the one rounding, as a dense layer adds it
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.mpo.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"modes={list(s.out_modes)}x{list(s.in_modes)}, bias={self.bias is not None}"
        )


class MPOEmbedding(nn.Module):
    """Row lookup in an MPO-held (num_embeddings, embedding_dim) table, times `embed_scale`.

    `embed_scale` carries the factor of scaled word embeddings (BART's `BartScaledWordEmbedding`).
    `dtype` is the dtype of the rows it returns, the replaced embedding's (float32 cores of a
    bfloat16 model give bfloat16 rows, each rounded once, as the merged table holds them);
    None: the cores' dtype.
    """

    def __init__(
        self,
        mpo: MPOCores,
        padding_idx: int | None = None,
        forward_mode: ForwardMode = "auto",
        embed_scale: float = 1.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.mpo = mpo
        self.num_embeddings = mpo.shape.out_dim
        self.embedding_dim = mpo.shape.in_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.forward_mode: ForwardMode = forward_mode
        self.dtype = dtype

    @property
    def weight(self) -> Tensor:
        """The dense table (rebuilt on access; for code that reads `embedding.weight`)."""
        return self.mpo.matrix()

    def chosen_mode(self, num_rows: int) -> Literal["reconstruct", "contract"]:
        if self.mpo.pruned is not None or self.mpo.round_to is not None:
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
        """input_ids (...) -> rows (..., embedding_dim) in `dtype`, times `embed_scale`."""
        dtype = self.dtype or self.mpo.core[0].dtype
        if self.chosen_mode(input_ids.numel()) == "reconstruct":
            rows = F.embedding(input_ids, self.mpo.matrix(), self.padding_idx).to(dtype)
        else:
            rows = mpo_rows(input_ids, _upcast(self.mpo.cores), self.mpo.shape).to(dtype)
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows

    def extra_repr(self) -> str:
        s = self.mpo.shape
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"modes={list(s.out_modes)}x{list(s.in_modes)}"
        )
