"""Numbers about MPOs: parameter counts, error bounds, measured errors, entanglement entropy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mposurgeon.mpo.contract import mpo_rows, to_matrix
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
    """||reference - approx||_F / ||reference||_F, computed in float64."""
    ref = reference.double()
    diff = float(torch.linalg.vector_norm(ref - approx.to(ref)))
    norm = float(torch.linalg.vector_norm(ref))
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
