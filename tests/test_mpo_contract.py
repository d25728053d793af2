"""Contracting inputs through MPO cores, row lookups, gradients and FLOP counts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from mposurgeon.errors import ShapeError
from mposurgeon.mpo import (
    MPOShape,
    apply_mpo,
    contract_flops,
    decompose,
    mpo_rows,
    plan_shape,
    reconstruct_flops,
    rows_flops,
    to_matrix,
    to_padded_matrix,
    truncate,
)

SHAPES = {
    "ffn-like": MPOShape(96, 48, (2, 3, 4, 2, 2), (2, 2, 3, 2, 2)),
    "padded": plan_shape(61, 37),
    "unit-modes": MPOShape(10, 7, (1, 2, 5, 1, 1), (1, 1, 7, 1, 1)),
    "2-cores": MPOShape(12, 10, (3, 4), (2, 5)),
    "1-core": MPOShape(6, 5, (6,), (5,)),
}


def mpo(shape: MPOShape, max_bond: int | None = None) -> tuple[Tensor, list[Tensor]]:
    """A random float64 matrix (truncated to max_bond when given) and its exact cores."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape.out_dim, shape.in_dim, generator=gen, dtype=torch.float64)
    cores = decompose(w, shape).cores
    if max_bond is not None:
        cores = truncate(cores, max_bond=max_bond).cores
    return to_matrix(cores, shape), cores


@pytest.mark.parametrize("name", SHAPES)
def test_apply_mpo_equals_dense_product(name: str) -> None:
    shape = SHAPES[name]
    w, cores = mpo(shape)
    x = torch.randn(2, 3, shape.in_dim, dtype=torch.float64)
    y = apply_mpo(x, cores, shape)
    assert y.shape == (2, 3, shape.out_dim)
    torch.testing.assert_close(y, x @ w.T, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(apply_mpo(x[0, 0], cores, shape), x[0, 0] @ w.T)


def test_apply_mpo_with_truncated_cores_and_float32() -> None:
    shape = SHAPES["ffn-like"]
    w, cores = mpo(shape, max_bond=3)
    x = torch.randn(5, shape.in_dim, dtype=torch.float64)
    torch.testing.assert_close(apply_mpo(x, cores, shape), x @ w.T)
    cores32 = [c.float() for c in cores]
    torch.testing.assert_close(apply_mpo(x.float(), cores32, shape), (x @ w.T).float())


def test_apply_mpo_rejects_wrong_features() -> None:
    shape = SHAPES["ffn-like"]
    _, cores = mpo(shape)
    with pytest.raises(ShapeError, match="48"):
        apply_mpo(torch.randn(2, 47, dtype=torch.float64), cores, shape)


@pytest.mark.parametrize("name", SHAPES)
def test_mpo_rows_equals_dense_rows(name: str) -> None:
    shape = SHAPES[name]
    w, cores = mpo(shape)
    idx = torch.randint(0, shape.out_dim, (3, 7))
    idx[0, :3] = torch.tensor([0, shape.out_dim - 1, 0])  # edges and a repeat
    rows = mpo_rows(idx, cores, shape)
    assert rows.shape == (3, 7, shape.in_dim)
    torch.testing.assert_close(rows, w[idx], atol=1e-12, rtol=1e-12)
    empty = mpo_rows(torch.zeros(0, dtype=torch.long), cores, shape)
    assert empty.shape == (0, shape.in_dim)


def test_mpo_rows_rejects_out_of_range() -> None:
    shape = SHAPES["padded"]
    _, cores = mpo(shape)
    with pytest.raises(IndexError):
        mpo_rows(torch.tensor([shape.out_dim]), cores, shape)  # a padding row is not a row


def test_gradients_match_the_dense_path() -> None:
    shape = SHAPES["padded"]
    _, cores = mpo(shape, max_bond=4)
    x = torch.randn(4, shape.in_dim, dtype=torch.float64)
    idx = torch.tensor([[1, 5, 5], [60, 0, 2]])
    grads = []
    for dense in (True, False):
        params = [c.clone().requires_grad_(True) for c in cores]
        if dense:
            w = to_matrix(params, shape)
            loss = (x @ w.T).square().sum() + w[idx].sin().sum()
        else:
            loss = apply_mpo(x, params, shape).square().sum()
            loss = loss + mpo_rows(idx, params, shape).sin().sum()
        grads.append(torch.autograd.grad(loss, params))
    for dense_grad, mpo_grad in zip(*grads, strict=True):
        assert dense_grad.abs().sum() > 0
        torch.testing.assert_close(mpo_grad, dense_grad)


def test_input_gradient_flows() -> None:
    shape = SHAPES["ffn-like"]
    w, cores = mpo(shape)
    x = torch.randn(3, shape.in_dim, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(apply_mpo(x, cores, shape).sum(), x)
    torch.testing.assert_close(grad, w.sum(0).expand(3, -1))


def _counted(fn) -> int:  # noqa: ANN001
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("max_bond", [None, 3])
def test_flop_counts_match_the_work_done(name: str, max_bond: int | None) -> None:
    shape = SHAPES[name]
    _, cores = mpo(shape, max_bond=max_bond)
    batch = 6
    x = torch.randn(batch, shape.in_dim, dtype=torch.float64)
    idx = torch.arange(min(batch, shape.out_dim))  # distinct rows
    assert reconstruct_flops(cores) >= 0 and contract_flops(cores, batch) > 0
    assert rows_flops(cores, idx.numel()) > 0
    assert _counted(lambda: to_padded_matrix(cores)) == 2 * reconstruct_flops(cores)
    assert _counted(lambda: apply_mpo(x, cores, shape)) == 2 * contract_flops(cores, batch)
    assert _counted(lambda: mpo_rows(idx, cores, shape)) == 2 * rows_flops(cores, idx.numel())
    assert contract_flops(cores, 2 * batch) == 2 * contract_flops(cores, batch)


def test_flop_formulas_on_a_known_shape() -> None:
    shape = MPOShape(6, 4, (2, 3), (2, 2))  # one bond of dim min(4, 6) = 4
    _, cores = mpo(shape)
    assert [tuple(c.shape) for c in cores] == [(1, 2, 2, 4), (4, 3, 2, 1)]
    assert reconstruct_flops(cores) == 4 * 4 * 3 * 2 * 1  # (I1 J1, r) @ (r, I2 J2)
    # core 1 sees batch * J2 rows of r0 J1 -> I1 r1; core 2 sees batch * I1 rows of r1 J2 -> I2
    assert contract_flops(cores, 1) == 2 * (1 * 2 * 2 * 4) + 2 * (4 * 2 * 3 * 1)
    assert rows_flops(cores, 1) == (1 * 2 * 4) + 2 * (4 * 2 * 1)
