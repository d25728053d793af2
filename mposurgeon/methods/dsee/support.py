"""The support of DSEE's sparse update: which `size` entries of a weight matrix may change.

Pure torch, no model: each function takes a weight (any orientation: the choice does not
depend on it) and returns `size` distinct flat positions in it, ascending (int64, CPU).

`godec` follows GoDec (Zhou & Tao 2011): W ~ L + S with L of rank r and S of `size` nonzeros,
fitted by alternating L = the rank-r approximation of W - S and S = the `size` largest entries
of W - L; the support is S's. The rank-r step is subspace iteration from a seeded random
probe, warm-started across alternations (float64), in place of the paper's bilateral random
projections: a 1536 x 384 matrix takes about 15 ms per alternation on one core.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Alternations of GoDec at most (it stops once the support stays the same).
GODEC_ITERATIONS = 10
#: Extra columns of the subspace iteration, and its steps per alternation.
OVERSAMPLING = 10
POWER_ITERATIONS = 2


def magnitude_support(weight: Tensor, size: int) -> Tensor:
    """The flat positions of the `size` largest |entries| of `weight`, ascending."""
    flat = weight.detach().reshape(-1).to("cpu", torch.float64)
    return flat.abs().topk(size).indices.sort().values


def random_support(numel: int, size: int, generator: torch.Generator) -> Tensor:
    """`size` distinct positions in [0, numel), uniformly at random under `generator`,
    ascending. Drawn with replacement and de-duplicated (every set of a size is as likely),
    so the cost grows with `size`, not with `numel`."""
    if size > numel:
        raise ValueError(f"{size} positions asked of {numel}")
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < size:
        draw = torch.randint(numel, (2 * (size - picked.numel()) + 16,), generator=generator)
        picked = torch.cat([picked, draw]).unique()
    keep = torch.randperm(picked.numel(), generator=generator)[:size]
    return picked[keep].sort().values


def godec_rank(shape: tuple[int, ...], rank: int) -> int:
    """The rank of GoDec's low-rank part for a matrix of `shape`: `rank`, at most half the
    smaller dimension (at full rank L would hold all of W and S nothing but rounding)."""
    return max(0, min(rank, min(shape) // 2))


def godec_support(
    weight: Tensor, rank: int, size: int, *, iterations: int = GODEC_ITERATIONS, seed: int = 0
) -> Tensor:
    """The flat positions of the sparse part S of a GoDec split `weight` ~ L + S (L of rank
    `godec_rank(weight.shape, rank)`, S of `size` nonzeros), ascending. Rank 0 (a matrix
    with a dimension of 1): the largest |entries|. The range finder is warm-started from the
    previous alternation's basis, so the low-rank step converges along with the split."""
    x = weight.detach().to("cpu", torch.float64)
    rank = godec_rank(tuple(x.shape), rank)
    if rank == 0:
        return magnitude_support(x, size)
    generator = torch.Generator().manual_seed(seed)
    columns = min(rank + OVERSAMPLING, *x.shape)
    probe = torch.randn(x.shape[1], columns, generator=generator, dtype=x.dtype)
    basis = torch.linalg.qr(x @ probe).Q
    sparse = torch.zeros_like(x)
    support: Tensor | None = None
    for _ in range(iterations):
        low, basis = low_rank(x - sparse, rank, basis)
        residual = (x - low).reshape(-1)
        found = residual.abs().topk(size).indices.sort().values
        sparse = torch.zeros_like(residual).index_copy_(0, found, residual[found]).view_as(x)
        if support is not None and torch.equal(found, support):
            break
        support = found
    assert support is not None
    return support


def low_rank(x: Tensor, rank: int, basis: Tensor) -> tuple[Tensor, Tensor]:
    """A rank-`rank` approximation of the matrix `x` (m, n), and the orthonormal basis (m, k)
    of its range it came from: `POWER_ITERATIONS` subspace iterations from `basis`, then the
    truncated SVD of the projection (exact when k reaches min(m, n))."""
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(x @ (x.T @ basis)).Q
    u, s, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    return (basis @ u[:, :rank]) * s[:rank] @ vh[:rank], basis
