"""Contracting MPO cores: into the matrix W, into x @ W.T or rows of W without forming W, and
the FLOP counts of each.

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
from mposurgeon.mpo.shapes import MPOShape, bonds_of, modes_of


def to_padded_matrix(cores: Sequence[Tensor]) -> Tensor:
    """Contract the cores into the padded matrix (padded_out, padded_in).

    cores[:c] are contracted from the left and cores[c:] from the right, each half kept with its
    out modes before its in modes, and the halves are joined by one product at bond c
    (`reconstruct_split`: the fewest multiply-adds). Keeping the modes apart as the halves grow
    costs small permutes, and spares one permute of a 2n-axis tensor of the whole matrix.
    """
    split = reconstruct_split(cores)
    left = _left_half(cores[:split])  # (O_L, I_L, r_c)
    if split == len(cores):  # a single core
        return left.reshape(left.shape[0], left.shape[1])
    right = _right_half(cores[split:])  # (r_c, O_R, I_R)
    (o_left, i_left, bond), (_, o_right, i_right) = left.shape, right.shape
    joined = left.reshape(o_left * i_left, bond) @ right.reshape(bond, o_right * i_right)
    joined = joined.reshape(o_left, i_left, o_right, i_right).permute(0, 2, 1, 3)
    return joined.reshape(o_left * o_right, i_left * i_right)


def _left_half(cores: Sequence[Tensor]) -> Tensor:
    """Cores (1, I_k, J_k, r) contracted left to right into (prod I, prod J, r_last)."""
    _, i, j, r = cores[0].shape
    state = cores[0].reshape(i, j, r)
    for core in cores[1:]:
        r, i, j, r_next = core.shape
        rows, cols = state.shape[0], state.shape[1]
        grown = (state.reshape(rows * cols, r) @ core.reshape(r, -1)).reshape(rows, cols, i, j, -1)
        state = grown.permute(0, 2, 1, 3, 4).reshape(rows * i, cols * j, r_next)
    return state


def _right_half(cores: Sequence[Tensor]) -> Tensor:
    """Cores (r, I_k, J_k, 1) contracted right to left into (r_first, prod I, prod J)."""
    r, i, j, _ = cores[-1].shape
    state = cores[-1].reshape(r, i, j)
    for core in reversed(cores[:-1]):
        r_prev, i, j, r = core.shape
        rows, cols = state.shape[1], state.shape[2]
        grown = (core.reshape(-1, r) @ state.reshape(r, rows * cols)).reshape(-1, i, j, rows, cols)
        state = grown.permute(0, 1, 3, 2, 4).reshape(r_prev, i * rows, j * cols)
    return state


def to_matrix(cores: Sequence[Tensor], shape: MPOShape) -> Tensor:
    """The represented matrix cropped to (out_dim, in_dim)."""
    shape.check_cores(cores)
    return to_padded_matrix(cores)[: shape.out_dim, : shape.in_dim]


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
