"""Numbers about MPOs: parameter counts, bond dims, error bounds, entanglement entropy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def num_params(cores: Sequence[Tensor]) -> int:
    """Sum over cores of r_{k-1} * I_k * J_k * r_k."""
    return sum(core.numel() for core in cores)


def bonds_of(cores: Sequence[Tensor]) -> tuple[int, ...]:
    """Bond dims (r_0, ..., r_n), length n+1, of cores shaped (r_{k-1}, I_k, J_k, r_k)."""
    return (int(cores[0].shape[0]), *(int(core.shape[3]) for core in cores))


def modes_of(cores: Sequence[Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_modes, in_modes) of cores shaped (r_{k-1}, I_k, J_k, r_k)."""
    return tuple(int(c.shape[1]) for c in cores), tuple(int(c.shape[2]) for c in cores)


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
