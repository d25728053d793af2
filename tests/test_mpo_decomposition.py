"""TT-SVD, canonical forms, bond spectra, truncation and metrics against exact expectations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mposurgeon.errors import ShapeError
from mposurgeon.mpo import (
    MPOShape,
    bond_spectra,
    bonds_of,
    canonicalize,
    decompose,
    entanglement_entropy,
    error_bound,
    measured_error,
    num_params,
    plan_shape,
    reconstruct_split,
    relative_error,
    to_matrix,
    to_padded_matrix,
    truncate,
)

SHAPES = {
    "ffn-like": MPOShape(96, 48, (2, 3, 4, 2, 2), (2, 2, 3, 2, 2)),
    "padded": plan_shape(61, 37),
    "unit-modes": MPOShape(10, 7, (1, 2, 5, 1, 1), (1, 1, 7, 1, 1)),
    "deep-15": MPOShape(48, 20, (1,) * 6 + (8, 6) + (1,) * 7, (1,) * 6 + (4, 5) + (1,) * 7),
    "1-core": MPOShape(6, 5, (6,), (5,)),
    "2-cores": MPOShape(12, 10, (3, 4), (2, 5)),
    "3-cores": MPOShape(24, 18, (2, 4, 3), (3, 3, 2)),
    "4-cores": MPOShape(40, 36, (2, 5, 2, 2), (3, 2, 3, 2)),
}


def random_matrix(shape: MPOShape, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape.out_dim, shape.in_dim, generator=gen, dtype=dtype)


def decaying_matrix(shape: MPOShape, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random MPO with bond dims <= 3 plus 1% noise: every bond spectrum decays steeply."""
    gen = torch.Generator().manual_seed(1)
    bonds = [min(b, 3) for b in shape.full_bonds()]
    cores = [
        torch.randn(bonds[k], i, j, bonds[k + 1], generator=gen, dtype=torch.float64)
        for k, (i, j) in enumerate(zip(shape.out_modes, shape.in_modes, strict=True))
    ]
    w = to_padded_matrix(cores)[: shape.out_dim, : shape.in_dim]
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    return (w + 0.01 * noise * w.norm() / noise.norm()).to(dtype)


def unfolding(matrix: Tensor, shape: MPOShape, bond: int) -> Tensor:
    """W padded, reshaped to (I1..In, J1..Jn), interleaved, split at inner bond `bond`."""
    n = shape.num_cores
    padded = torch.zeros(shape.padded_out, shape.padded_in, dtype=matrix.dtype)
    padded[: shape.out_dim, : shape.in_dim] = matrix
    order = [p for k in range(n) for p in (k, n + k)]
    tensor = padded.reshape(*shape.out_modes, *shape.in_modes).permute(order)
    rows = math.prod(
        i * j for i, j in zip(shape.out_modes[:bond], shape.in_modes[:bond], strict=True)
    )
    return tensor.reshape(rows, -1)


def gauged(cores: list[Tensor], seed: int = 3) -> list[Tensor]:
    """The same MPO with a random invertible matrix (and its inverse) on every inner bond."""
    gen = torch.Generator().manual_seed(seed)
    result = list(cores)
    for k in range(len(cores) - 1):
        r = result[k].shape[3]
        g = torch.eye(r, dtype=cores[k].dtype) + 0.5 * torch.randn(
            r, r, generator=gen, dtype=cores[k].dtype
        )
        result[k] = torch.tensordot(result[k], g, dims=1)
        result[k + 1] = torch.tensordot(torch.linalg.inv(g), result[k + 1], dims=1)
    return result


def assert_left_orthogonal(core: Tensor) -> None:
    mat = core.reshape(-1, core.shape[3])
    eye = torch.eye(mat.shape[1], dtype=mat.dtype)
    torch.testing.assert_close(mat.T @ mat, eye, atol=1e-10, rtol=0)


def assert_right_orthogonal(core: Tensor) -> None:
    mat = core.reshape(core.shape[0], -1)
    eye = torch.eye(mat.shape[0], dtype=mat.dtype)
    torch.testing.assert_close(mat @ mat.T, eye, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", SHAPES)
def test_lossless_round_trip_float64(name: str) -> None:
    shape = SHAPES[name]
    w = random_matrix(shape)
    dec = decompose(w, shape)
    assert torch.equal(w, random_matrix(shape))  # the input is left alone
    assert relative_error(w, to_matrix(dec.cores, shape)) <= 1e-12
    assert dec.predicted_error == 0.0
    assert bonds_of(dec.cores) == shape.full_bonds()
    assert all(core.dtype == torch.float64 for core in dec.cores)
    padded = to_padded_matrix(dec.cores)
    assert padded.shape == (shape.padded_out, shape.padded_in)
    assert padded[shape.out_dim :].norm() <= 1e-12
    assert padded[:, shape.in_dim :].norm() <= 1e-12


@pytest.mark.parametrize("name", ["ffn-like", "padded", "unit-modes", "deep-15", "4-cores"])
def test_lossless_round_trip_float32(name: str) -> None:
    shape = SHAPES[name]
    w = random_matrix(shape, torch.float32)
    dec = decompose(w, shape)
    assert all(core.dtype == torch.float32 for core in dec.cores)
    assert relative_error(w, to_matrix(dec.cores, shape)) <= 1e-5
    assert bonds_of(dec.cores) == shape.full_bonds()


def test_bert_sized_round_trip_float32() -> None:
    shape = plan_shape(384, 1536)
    w = random_matrix(shape, torch.float32)
    assert relative_error(w, to_matrix(decompose(w, shape).cores, shape)) <= 2e-6


def test_core_layout_params_and_central_core() -> None:
    shape = SHAPES["ffn-like"]
    dec = decompose(random_matrix(shape), shape)
    bonds = shape.full_bonds()
    for k, core in enumerate(dec.cores):
        assert core.shape == (bonds[k], shape.out_modes[k], shape.in_modes[k], bonds[k + 1])
    expected = sum(
        bonds[k] * shape.out_modes[k] * shape.in_modes[k] * bonds[k + 1] for k in range(5)
    )
    assert num_params(dec.cores) == expected
    central = dec.cores[shape.central_index].numel()
    assert central == max(core.numel() for core in dec.cores)


def test_decompose_is_mixed_canonical_around_the_central_core() -> None:
    shape = SHAPES["ffn-like"]
    dec = decompose(random_matrix(shape), shape)
    for k, core in enumerate(dec.cores):
        if k < shape.central_index:
            assert_left_orthogonal(core)
        elif k > shape.central_index:
            assert_right_orthogonal(core)


@pytest.mark.parametrize("name", ["ffn-like", "padded", "unit-modes", "4-cores", "2-cores"])
def test_spectra_are_singular_values_of_the_unfoldings(name: str) -> None:
    shape = SHAPES[name]
    w = random_matrix(shape)
    dec = decompose(w, shape)
    assert len(dec.spectra) == shape.num_cores - 1
    for k, spectrum in enumerate(dec.spectra, start=1):
        expected = torch.linalg.svdvals(unfolding(w, shape, k))
        assert spectrum.dtype == torch.float64
        torch.testing.assert_close(spectrum, expected, atol=1e-7 * float(expected[0]), rtol=0)


def test_spectra_of_float32_input() -> None:
    shape = SHAPES["ffn-like"]
    w = random_matrix(shape, torch.float32)
    dec = decompose(w, shape)
    for k, spectrum in enumerate(dec.spectra, start=1):
        expected = torch.linalg.svdvals(unfolding(w.double(), shape, k))
        torch.testing.assert_close(spectrum, expected, atol=1e-5 * float(expected[0]), rtol=0)


def test_decompose_rejects_a_matrix_of_another_shape() -> None:
    with pytest.raises(ShapeError, match="does not match"):
        decompose(torch.zeros(5, 5), MPOShape(4, 4, (2, 2), (2, 2)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decompose_one_cut_bond_error_is_exact(dtype: torch.dtype) -> None:
    shape = SHAPES["ffn-like"]
    w = decaying_matrix(shape, dtype)
    full = shape.full_bonds()
    dec = decompose(w, shape, max_bond=[full[1], 9, full[3], full[4]])
    assert bonds_of(dec.cores)[2] == 9
    discarded = torch.linalg.svdvals(unfolding(w.double(), shape, 2))[9:]
    exact = float(discarded.norm() / w.double().norm())
    measured = relative_error(w, to_matrix(dec.cores, shape))
    assert dec.predicted_error == pytest.approx(exact, abs=1e-9)
    assert measured == pytest.approx(dec.predicted_error, abs=1e-6)


def test_decompose_several_cut_bonds_within_bound_and_rel_tol() -> None:
    shape = SHAPES["ffn-like"]
    w = decaying_matrix(shape)
    dec = decompose(w, shape, max_bond=5)
    assert max(bonds_of(dec.cores)) <= 5
    assert 0 < relative_error(w, to_matrix(dec.cores, shape)) <= dec.predicted_error + 1e-12
    for tol in (0.3, 0.05, 0.01):
        dec = decompose(w, shape, rel_tol=tol)
        assert relative_error(w, to_matrix(dec.cores, shape)) <= dec.predicted_error + 1e-12
        assert dec.predicted_error <= tol
        assert num_params(dec.cores) < num_params(decompose(w, shape).cores)


@pytest.mark.parametrize("name", ["ffn-like", "padded", "4-cores", "deep-15"])
def test_canonicalize_orthogonality_and_invariance(name: str) -> None:
    shape = SHAPES[name]
    w = random_matrix(shape)
    cores = gauged(decompose(w, shape).cores)
    for center in range(shape.num_cores):
        canon = canonicalize(cores, center)
        for k, core in enumerate(canon):
            if k < center:
                assert_left_orthogonal(core)
            elif k > center:
                assert_right_orthogonal(core)
        assert relative_error(w, to_matrix(canon, shape)) <= 1e-12


def test_bond_spectra_of_any_gauge() -> None:
    shape = SHAPES["ffn-like"]
    w = random_matrix(shape)
    spectra = bond_spectra(gauged(decompose(w, shape).cores))
    for k, spectrum in enumerate(spectra, start=1):
        expected = torch.linalg.svdvals(unfolding(w, shape, k))
        torch.testing.assert_close(spectrum, expected, atol=1e-10 * float(expected[0]), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_truncate_one_bond_error_equals_prediction(dtype: torch.dtype) -> None:
    shape = SHAPES["ffn-like"]
    w = decaying_matrix(shape, dtype)
    cores = (
        gauged(decompose(w, shape).cores) if dtype == torch.float64 else decompose(w, shape).cores
    )
    full = shape.full_bonds()
    cut = truncate(cores, max_bond=[full[1], full[2], 7, full[4]])
    assert cut.bonds == (*full[:3], 7, *full[4:])
    assert all(core.dtype == dtype for core in cut.cores)
    discarded = torch.linalg.svdvals(unfolding(w.double(), shape, 3))[7:]
    assert cut.predicted_error == pytest.approx(
        float(discarded.norm() / w.double().norm()), abs=1e-7
    )
    assert relative_error(w, to_matrix(cut.cores, shape)) == pytest.approx(
        cut.predicted_error, abs=1e-6
    )


def test_truncate_several_bonds_is_bounded_and_gauge_independent() -> None:
    shape = SHAPES["ffn-like"]
    w = decaying_matrix(shape)
    canonical = decompose(w, shape).cores
    cut = truncate(canonical, max_bond=4)
    cut_gauged = truncate(gauged(canonical), max_bond=4)
    assert cut.bonds == cut_gauged.bonds and max(cut.bonds) <= 4
    measured = relative_error(w, to_matrix(cut.cores, shape))
    assert 0 < measured <= cut.predicted_error + 1e-12
    assert cut_gauged.predicted_error == pytest.approx(cut.predicted_error, abs=1e-10)
    torch.testing.assert_close(to_matrix(cut_gauged.cores, shape), to_matrix(cut.cores, shape))
    # the result is mixed-canonical around the central core, like decompose's
    assert_left_orthogonal(cut.cores[0])
    assert_right_orthogonal(cut.cores[-1])


def test_truncate_keeps_smaller_bonds_and_honours_rel_tol() -> None:
    shape = SHAPES["ffn-like"]
    w = decaying_matrix(shape)
    cores = decompose(w, shape).cores
    same = truncate(cores, max_bond=[10_000] * 4)
    assert same.bonds == shape.full_bonds() and same.predicted_error == pytest.approx(0, abs=1e-7)
    assert relative_error(w, to_matrix(same.cores, shape)) <= 1e-12
    for tol in (0.2, 0.02):
        cut = truncate(cores, rel_tol=tol)
        assert cut.predicted_error <= tol
        assert relative_error(w, to_matrix(cut.cores, shape)) <= tol
        assert num_params(cut.cores) < num_params(cores)
    with pytest.raises(ValueError, match="per-bond"):
        truncate(cores, max_bond=[3, 3])


def test_error_bound_from_spectra() -> None:
    shape = SHAPES["ffn-like"]
    w = decaying_matrix(shape)
    spectra = decompose(w, shape).spectra
    assert error_bound(spectra, shape.full_bonds()) == 0.0
    bonds = list(shape.full_bonds())
    bonds[2] = 5
    expected = float(spectra[1][5:].norm() / w.norm())
    assert error_bound(spectra, bonds) == pytest.approx(expected, rel=1e-12)


def test_entanglement_entropy() -> None:
    assert entanglement_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    assert entanglement_entropy(torch.tensor([3.0, 0.0, 0.0])) == 0.0
    assert entanglement_entropy(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(math.log(2))
    assert entanglement_entropy(torch.zeros(3)) == 0.0


def test_relative_error() -> None:
    a = torch.tensor([[3.0, 4.0]])
    assert relative_error(a, a) == 0.0
    assert relative_error(a, torch.zeros(1, 2)) == pytest.approx(1.0)
    assert relative_error(a, a * 1.1) == pytest.approx(0.1)


@pytest.mark.parametrize("block", [None, 7, 1])  # whole, blocks of rows, one entry at a time
def test_measured_error_of_two_mpos(block: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = SHAPES["padded"]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape.out_dim, shape.in_dim, generator=gen, dtype=torch.float64)
    full = decompose(w.float(), shape).cores
    cut = truncate(full, max_bond=2).cores
    if block is not None:
        monkeypatch.setattr("mposurgeon.mpo.metrics._ERROR_BLOCK", block)
    before, after = ([c.double() for c in cores] for cores in (full, cut))
    expected = relative_error(to_matrix(before, shape), to_matrix(after, shape))  # float64
    assert measured_error(full, cut, shape) == pytest.approx(expected, rel=1e-12)
    assert measured_error(full, full, shape) == 0.0
    zero = [torch.zeros_like(c) for c in full]
    assert measured_error(zero, zero, shape) == 0.0
    assert measured_error(zero, full, shape) == math.inf


def _naive_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """W from the definition: chain the cores over their bonds, then order the out modes
    before the in modes."""
    chain = cores[0]
    for core in cores[1:]:
        chain = torch.tensordot(chain, core, dims=([chain.dim() - 1], [0]))
    chain = chain.squeeze(0).squeeze(-1)
    n = len(cores)
    chain = chain.permute([2 * k for k in range(n)] + [2 * k + 1 for k in range(n)])
    rows = math.prod(c.shape[1] for c in cores)
    return chain.reshape(rows, -1)


@pytest.mark.parametrize("seed", range(12))
def test_to_padded_matrix_matches_the_definition(seed: int) -> None:
    """Random chains of 1 to 6 cores, unit modes and bonds of 1 included, whichever bond the
    reconstruction joins its halves at."""
    gen = torch.Generator().manual_seed(seed)
    n = 1 + seed % 6
    modes = [
        (
            int(torch.randint(1, 4, (1,), generator=gen)),
            int(torch.randint(1, 4, (1,), generator=gen)),
        )
        for _ in range(n)
    ]
    bonds = [1] + [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(n - 1)] + [1]
    cores = [
        torch.randn(bonds[k], o, i, bonds[k + 1], generator=gen, dtype=torch.float64)
        for k, (o, i) in enumerate(modes)
    ]
    torch.testing.assert_close(
        to_padded_matrix(cores), _naive_matrix(cores), rtol=1e-12, atol=1e-12
    )
    assert 1 <= reconstruct_split(cores) <= max(1, n - 1)


def test_relative_error_of_a_large_matrix_is_summed_by_rows() -> None:
    """Above 4M entries the float64 error is summed a block of rows at a time (no float64 copy
    of the whole matrix): the same value as at once, to float64 round-off."""
    torch.manual_seed(0)
    reference = torch.randn(2051, 2048)  # 2 blocks and a ragged remainder
    approx = reference + 1e-3 * torch.randn_like(reference)
    ref = reference.double()
    at_once = float(torch.linalg.vector_norm(ref - approx.double()) / torch.linalg.vector_norm(ref))
    assert relative_error(reference, approx) == pytest.approx(at_once, rel=1e-10)
    assert relative_error(reference.bfloat16(), reference.bfloat16()) == 0.0
    assert relative_error(torch.zeros(2051, 2048), approx) == math.inf
