"""Using an MPO without forming W: x @ W.T through the cores, row lookups, and FLOP counts.

All counts are multiply-adds. A layer compares `contract_flops(cores, batch)` with
`reconstruct_flops(cores)` plus the dense product (batch * out * in) to pick its forward;
`reconstruct_split` tells `to_padded_matrix` where to join its two halves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mposurgeon.errors import ShapeError
from mposurgeon.mpo.metrics import bonds_of, modes_of
from mposurgeon.mpo.shapes import MPOShape


def apply_mpo(x: Tensor, cores: Sequence[Tensor], shape: MPOShape) -> Tensor:
    """x (..., in_dim) -> x @ W.T (..., out_dim), contracting through the cores one by one.

    The state before core k is (J_k+1..J_n, batch, I_1..I_k-1, r_k-1, J_k): its last two axes
    meet core k as one matmul, then J_k+1 is rotated from the front to the back.
    """
    shape.check_cores(cores)
    if x.shape[-1] != shape.in_dim:
        raise ShapeError(f"input has {x.shape[-1]} features, the MPO expects {shape.in_dim}")
    lead = x.shape[:-1]
    flat = F.pad(x.reshape(-1, shape.in_dim), (0, shape.in_padding))
    batch = flat.shape[0]
    state = flat.reshape(batch, shape.in_modes[0], -1).permute(2, 0, 1)  # (J_2.., B, J_1)
    for k, core in enumerate(cores):
        r, i, j, r_next = core.shape
        mat = core.permute(0, 2, 1, 3).reshape(r * j, i * r_next)
        state = state.reshape(-1, r * j) @ mat  # (J_k+1.., B, I_1..I_k, r_k)
        if k + 1 < len(cores):
            state = state.reshape(shape.in_modes[k + 1], -1).mT
    out = state.reshape(batch, shape.padded_out)[:, : shape.out_dim]
    return out.reshape(*lead, shape.out_dim)


def mpo_rows(indices: Tensor, cores: Sequence[Tensor], shape: MPOShape) -> Tensor:
    """Rows W[indices] (..., in_dim) for an embedding lookup, without forming W.

    Unique indices are split into out-mode digits; at each core the rows are grouped by digit so
    that each group meets its core slice (r, J, r') as one matmul.
    """
    shape.check_cores(cores)
    flat = indices.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= shape.out_dim):
        raise IndexError(f"row index out of range for an MPO with {shape.out_dim} rows")
    unique, inverse = torch.unique(flat, return_inverse=True)
    count = unique.numel()
    strides = [math.prod(shape.out_modes[k + 1 :]) for k in range(shape.num_cores)]
    digits = torch.stack(
        [(unique // s) % m for s, m in zip(strides, shape.out_modes, strict=True)], dim=1
    )
    order = torch.arange(count, device=flat.device)
    state = cores[0].new_ones(count, 1, 1)  # (rows, J_1..J_k-1, r_k-1)
    for k, core in enumerate(cores):
        r, i, j, r_next = core.shape
        regroup = torch.argsort(digits[:, k], stable=True)
        state, digits, order = state[regroup], digits[regroup], order[regroup]
        sizes = torch.bincount(digits[:, k], minlength=i).tolist()
        pieces = [
            group @ core[:, d].reshape(r, j * r_next) for d, group in enumerate(state.split(sizes))
        ]
        state = torch.cat(pieces).reshape(count, math.prod(shape.in_modes[: k + 1]), r_next)
    rows = state.reshape(count, shape.padded_in)[:, : shape.in_dim]
    rows = rows[torch.argsort(order)]
    return rows[inverse].reshape(*indices.shape, shape.in_dim)


def reconstruct_flops(cores: Sequence[Tensor]) -> int:
    """Multiply-adds of `to_padded_matrix` (halves joined at `reconstruct_split(cores)`)."""
    return min(_split_costs(cores))


def reconstruct_split(cores: Sequence[Tensor]) -> int:
    """The bond c (1 <= c < n) at which `to_padded_matrix` joins cores[:c] and cores[c:]: the
    one that needs the fewest multiply-adds, the first of equals (1 for a single core)."""
    costs = _split_costs(cores)
    return 1 + costs.index(min(costs))


def _split_costs(cores: Sequence[Tensor]) -> list[int]:
    """Multiply-adds of reconstructing W with the halves joined at bond c, for c = 1 .. n-1.

    The left half grows from core 0 rightwards, the right half from core n-1 leftwards; the
    last product is (prod of the left halves' I J, r_c) @ (r_c, prod of the right halves' I J).
    """
    (out_modes, in_modes), bonds = modes_of(cores), bonds_of(cores)
    n = len(cores)
    sizes = [o * i for o, i in zip(out_modes, in_modes, strict=True)]
    left = [0] * (n + 1)  # left[c]: cost of contracting cores[:c]
    for k in range(1, n):
        left[k + 1] = left[k] + math.prod(sizes[:k]) * bonds[k] * sizes[k] * bonds[k + 1]
    right = [0] * (n + 1)  # right[c]: cost of contracting cores[c:]
    for k in range(n - 2, -1, -1):
        right[k] = right[k + 1] + bonds[k] * sizes[k] * bonds[k + 1] * math.prod(sizes[k + 1 :])
    costs = [
        left[c] + right[c] + math.prod(sizes[:c]) * bonds[c] * math.prod(sizes[c:])
        for c in range(1, n)
    ]
    return costs or [0]  # one core: nothing to contract


def contract_flops(cores: Sequence[Tensor], batch: int) -> int:
    """Multiply-adds of `apply_mpo` on `batch` input rows."""
    (out_modes, in_modes), bonds = modes_of(cores), bonds_of(cores)
    total = 0
    for k in range(len(cores)):
        rows = batch * math.prod(out_modes[:k]) * math.prod(in_modes[k + 1 :])
        total += rows * bonds[k] * in_modes[k] * out_modes[k] * bonds[k + 1]
    return total


def rows_flops(cores: Sequence[Tensor], num_rows: int) -> int:
    """Multiply-adds of `mpo_rows` for `num_rows` distinct rows."""
    in_modes, bonds = modes_of(cores)[1], bonds_of(cores)
    per_row = sum(
        math.prod(in_modes[:k]) * bonds[k] * in_modes[k] * bonds[k + 1] for k in range(len(cores))
    )
    return num_rows * per_row
