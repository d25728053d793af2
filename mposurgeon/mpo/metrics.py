"""Numbers about MPOs: parameter counts, error bounds, measured errors, entanglement entropy."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mposurgeon.mpo.contract import mpo_rows, to_matrix, to_padded_matrix
from mposurgeon.mpo.shapes import MPOShape

#: matrix entries contracted at a time by `measured_error`
_ERROR_BLOCK = 1 << 22


def num_params(cores: Sequence[Tensor]) -> int:
    """Sum over cores of r_{k-1} * I_k * J_k * r_k."""
    return sum(core.numel() for core in cores)


def error_bound(spectra: Sequence[Tensor], bonds: Sequence[int]) -> float:
    """Relative Frobenius error bound sqrt(sum_k sum_{i >= r_k} s_{k,i}^2) / ||W||.

    spectra: singular values per inner bond (n-1 tensors, descending; spectra[0] must be the
    untruncated spectrum of W, so that sum(spectra[0]^2) = ||W||^2); bonds: kept dims (length
    n+1). For one cut bond this is the exact error; for several it bounds it.
    """
    if len(bonds) != len(spectra) + 2:
        raise ValueError(f"{len(spectra)} spectra need {len(spectra) + 2} bonds, got {len(bonds)}")
    if not spectra:
        return 0.0
    total = float(spectra[0].double().square().sum())
    if total == 0.0:
        return 0.0
    lost = sum(
        float(s[r:].double().square().sum()) for s, r in zip(spectra, bonds[1:-1], strict=True)
    )
    return math.sqrt(lost / total)


def entanglement_entropy(singular_values: Tensor) -> float:
    """-sum p log p with p = s^2 / sum s^2 (natural log, zeros ignored)."""
    weights = singular_values.double().square()
    weights = weights[weights > 0]
    if weights.numel() == 0:
        return 0.0
    p = weights / weights.sum()
    return float(-(p * p.log()).sum())


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """||reference - approx||_F / ||reference||_F, computed in float64: at once for up to
    `_ERROR_BLOCK` entries, else a block of rows at a time (no float64 copy of a large matrix)."""
    if reference.numel() <= _ERROR_BLOCK or reference.dim() != 2:
        ref = reference.double()
        diff = float(torch.linalg.vector_norm(ref - approx.to(ref)))
        norm = float(torch.linalg.vector_norm(ref))
    else:
        block = max(1, _ERROR_BLOCK // reference.shape[1])
        diff2 = norm2 = 0.0
        for start in range(0, reference.shape[0], block):
            ref = reference[start : start + block].double()
            rows = approx[start : start + block].to(ref)
            diff2 += float(torch.linalg.vector_norm(ref - rows)) ** 2
            norm2 += float(torch.linalg.vector_norm(ref)) ** 2
        diff, norm = math.sqrt(diff2), math.sqrt(norm2)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


@torch.no_grad()
def measured_error(before: Sequence[Tensor], after: Sequence[Tensor], shape: MPOShape) -> float:
    """||W_before - W_after||_F / ||W_before||_F in float64. A matrix of more than about 4M
    entries is contracted a block of rows at a time, so memory stays bounded for embeddings."""
    a, b = [c.double() for c in before], [c.double() for c in after]
    if shape.out_dim * shape.in_dim <= _ERROR_BLOCK:
        return relative_error(to_matrix(a, shape), to_matrix(b, shape))
    block = max(1, _ERROR_BLOCK // shape.in_dim)
    diff2 = norm2 = 0.0
    for start in range(0, shape.out_dim, block):
        rows = torch.arange(start, min(start + block, shape.out_dim))
        ra, rb = mpo_rows(rows, a, shape), mpo_rows(rows, b, shape)
        diff2 += float((ra - rb).square().sum())
        norm2 += float(ra.square().sum())
    if norm2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / norm2)


#: matrix entries contracted at a time by `matrix_error` (32 MB in float64)
_CONTRACT_BLOCK = 1 << 22
#: below this relative error `matrix_error` contracts in float64: float32 contraction leaves
#: ~1e-7 ||W|| of round-off in each matrix, which moves an error e by ~1e-13 / e^2 relative
#: (measured: 1.4e-6 at e = 1e-3, 4e-8 at 1e-2, 2e-9 at 0.1); above 1e-2 that is < 1e-8
FLOAT32_ERROR_FLOOR = 1e-2


@torch.no_grad()
def matrix_error(before: Sequence[Tensor], after: Sequence[Tensor], shape: MPOShape) -> float:
    """||W_before - W_after||_F / ||W_before||_F, contracting each MPO to its matrix once.

    Same value as `measured_error` (to ~1e-8 relative), without its row-by-row float64 path:
    cores are contracted in float32 (float64 cores: float64) a block of rows at a time (the
    leading out-mode digits fixed, at most `_CONTRACT_BLOCK` entries a block, so memory stays
    a few blocks), differences and squares summed in float64. A float32 result below
    `FLOAT32_ERROR_FLOOR` is recomputed with float64 contraction, where float32 round-off
    would show.
    """
    if before[0].dtype != torch.float64:
        error = _blocked_error(before, after, shape, torch.float32)
        if error >= FLOAT32_ERROR_FLOOR:
            return error
    return _blocked_error(before, after, shape, torch.float64)


def _blocked_error(
    before: Sequence[Tensor], after: Sequence[Tensor], shape: MPOShape, dtype: torch.dtype
) -> float:
    """`matrix_error` with contraction in `dtype`; blocks of rows share their leading digits."""
    shape.check_cores(before)
    shape.check_cores(after)
    a, b = [c.to(dtype) for c in before], [c.to(dtype) for c in after]
    n, out_modes = shape.num_cores, shape.out_modes
    fixed = 0  # leading out modes fixed per block
    while fixed < n and math.prod(out_modes[fixed:]) * shape.padded_in > _CONTRACT_BLOCK:
        fixed += 1
    rows = math.prod(out_modes[fixed:])  # padded rows per block
    diff2 = norm2 = 0.0
    for digits in itertools.product(*(range(m) for m in out_modes[:fixed])):
        start = sum(d * math.prod(out_modes[k + 1 :]) for k, d in enumerate(digits))
        if start >= shape.out_dim:
            break  # only padding below
        keep = min(rows, shape.out_dim - start)
        pieces = []
        for cores in (a, b):
            sliced = [c[:, d : d + 1] for c, d in zip(cores, digits, strict=False)]
            matrix = to_padded_matrix([*sliced, *cores[fixed:]])
            pieces.append(matrix.reshape(rows, shape.padded_in)[:keep, : shape.in_dim])
        ref, approx = pieces
        norm2 += _sum_squares(ref)
        diff2 += _sum_squares(ref - approx)
    if norm2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / norm2)


def _sum_squares(values: Tensor, width: int = 256) -> float:
    """sum(values^2): norms of `width`-entry pieces in the values' dtype, their squares summed
    in float64 (relative error ~1e-10 for float32, where one float32 norm is off by ~1e-4)."""
    flat = values.reshape(-1)
    whole = flat.numel() - flat.numel() % width
    total = torch.linalg.vector_norm(flat[:whole].view(-1, width), dim=1).double().square().sum()
    return float(total + flat[whole:].double().square().sum())
