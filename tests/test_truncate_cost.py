"""truncate's cheaper paths give what the exact ones give: `gram_spectra` = `bond_spectra`,
`matrix_error` / `truncation_error` = `measured_error`, `recompress` cuts within its caps and
the plan's error bound, and the stage plans from the spectra decompose recorded (the plan
exact spectra give) and cuts bitwise as `recompress` of the input at that plan."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.mpo.contract import to_padded_matrix
from mposurgeon.mpo.decomposition import (
    bond_spectra,
    decompose,
    gram_spectra,
    recompress,
    truncate,
    truncation_error,
)
from mposurgeon.mpo.metrics import (
    FLOAT32_ERROR_FLOOR,
    error_bound,
    matrix_error,
    measured_error,
    relative_error,
)
from mposurgeon.mpo.shapes import MPOShape, bonds_of, plan_shape

SHAPES = {
    "ffn-like": MPOShape(96, 48, (2, 3, 4, 2, 2), (2, 2, 3, 2, 2)),
    "padded": plan_shape(61, 37),
    "unit-modes": MPOShape(10, 7, (1, 2, 5, 1, 1), (1, 1, 7, 1, 1)),
    "3-cores": MPOShape(24, 18, (2, 4, 3), (3, 3, 2)),
    "2-cores": MPOShape(12, 10, (3, 4), (2, 5)),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _cores(shape: MPOShape, dtype: torch.dtype, noise: float | None = None) -> list[Tensor]:
    """Lossless MPO of a random matrix; with `noise`, of a bond-2 MPO plus that much noise
    (so that a cut to bond 2 leaves an error of about `noise`)."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(shape.out_dim, shape.in_dim, generator=gen, dtype=torch.float64)
    if noise is not None:
        low = decompose(w, shape, max_bond=2).cores
        base = to_padded_matrix(low)[: shape.out_dim, : shape.in_dim]
        extra = torch.randn(base.shape, generator=gen, dtype=torch.float64)
        w = base / base.norm() + noise * extra / extra.norm()
    return decompose(w.to(dtype), shape).cores


def _gauged(cores: list[Tensor], spread: float) -> list[Tensor]:
    """The same MPO in another gauge: X = (I + noise) diag(1 .. spread) on bond 1."""
    gen = torch.Generator().manual_seed(3)
    r = cores[0].shape[-1]
    x = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(r, r, generator=gen)
    x = x * torch.logspace(0, math.log10(spread), r, dtype=torch.float64)
    out = [core.double() for core in cores]
    out[0] = torch.tensordot(out[0], x, dims=1)
    out[1] = torch.tensordot(torch.linalg.inv(x), out[1], dims=1)
    return out


def _same_spectra(expected: list[Tensor], got: list[Tensor], tol: float = 1e-10) -> None:
    assert [s.numel() for s in got] == [s.numel() for s in expected]
    for old, new in zip(expected, got, strict=True):
        assert new.dtype == torch.float64
        assert bool((new[:-1] >= new[1:]).all())  # descending
        top = float(old[0]) ** 2
        assert float((old.square() - new.square()).abs().max()) <= tol * top


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_gram_spectra_equal_bond_spectra(name: str, dtype: torch.dtype) -> None:
    cores = _cores(SHAPES[name], dtype)
    _same_spectra(bond_spectra(cores), gram_spectra(cores))
    cut = truncate(cores, max_bond=2).cores  # bonds below their rank bounds
    _same_spectra(bond_spectra(cut), gram_spectra(cut))


@pytest.mark.parametrize("spread", [1.0, 1e3, 1e6])  # the last is beyond _GAUGE_LIMIT
def test_gram_spectra_are_gauge_free(spread: float, monkeypatch: pytest.MonkeyPatch) -> None:
    cores = _cores(SHAPES["ffn-like"], torch.float64)
    expected = bond_spectra(cores)
    calls: list[int] = []

    def spy(cores: list[Tensor]) -> list[Tensor]:
        calls.append(len(cores))
        return bond_spectra(cores)

    monkeypatch.setattr("mposurgeon.mpo.decomposition.bond_spectra", spy)
    _same_spectra(expected, gram_spectra(_gauged(cores, spread)), tol=1e-9)
    assert bool(calls) == (spread > 1e4)  # a far-from-canonical gauge falls back


def test_gram_spectra_of_a_zero_mpo_and_one_core() -> None:
    zero = [torch.zeros_like(core) for core in _cores(SHAPES["3-cores"], torch.float32)]
    assert all(float(s.abs().max()) == 0.0 for s in gram_spectra(zero))
    assert gram_spectra(_cores(MPOShape(6, 5, (6,), (5,)), torch.float32)) == []


@pytest.mark.parametrize("block", [None, 200])  # whole, a few rows a block (across padding)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_matrix_error_equals_measured_error(
    name: str, dtype: torch.dtype, block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = SHAPES[name]
    if block is not None:
        monkeypatch.setattr("mposurgeon.mpo.metrics._CONTRACT_BLOCK", block)
    cores = _cores(shape, dtype)
    for cap in (1, 2, 4):
        cut = truncate(cores, max_bond=cap).cores
        expected = measured_error(cores, cut, shape)
        assert matrix_error(cores, cut, shape) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert matrix_error(cores, cores, shape) == 0.0
    zero = [torch.zeros_like(c) for c in cores]
    assert matrix_error(zero, zero, shape) == 0.0
    assert matrix_error(zero, cores, shape) == float("inf")


def test_matrix_error_one_row_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = SHAPES["padded"]
    monkeypatch.setattr("mposurgeon.mpo.metrics._CONTRACT_BLOCK", 1)
    cores = _cores(shape, torch.float32)
    cut = truncate(cores, max_bond=2).cores
    expected = measured_error(cores, cut, shape)
    assert matrix_error(cores, cut, shape) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("noise", [1e-1, 1e-3, 1e-5])  # above and below FLOAT32_ERROR_FLOOR
def test_small_errors_fall_back_to_float64_contraction(noise: float) -> None:
    shape = SHAPES["ffn-like"]
    cores = _cores(shape, torch.float32, noise=noise)
    cut = truncate(cores, max_bond=2).cores
    expected = measured_error(cores, cut, shape)
    assert expected == pytest.approx(noise, rel=0.1)
    assert (expected < FLOAT32_ERROR_FLOOR) == (noise < FLOAT32_ERROR_FLOOR)
    assert matrix_error(cores, cut, shape) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", [None, 1e-2, 1e-5])
def test_truncation_error_equals_measured_error(dtype: torch.dtype, noise: float | None) -> None:
    shape = SHAPES["ffn-like"]
    cores = _cores(shape, dtype, noise=noise)
    # several bonds cut at once: the identity is exact for the sequential cut, not only one bond
    for bonds in ([2, 2, 2, 2], [4, 8, 6, 2], [1, 12, 12, 4]):
        cut, matrix = recompress(cores, shape, bonds)
        expected = measured_error(cores, cut.cores, shape)
        assert truncation_error(cores, matrix, cut, shape) == pytest.approx(expected, rel=1e-6)
        if dtype == torch.float64:  # the identity, from Gram eigenvalues: ~1e-16 ||W||^2 off
            assert cut.predicted_error**2 == pytest.approx(expected**2, rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("name", SHAPES)
def test_recompress_cuts_within_the_caps_and_the_plans_bound(name: str) -> None:
    shape = SHAPES[name]
    cores = _gauged(_cores(shape, torch.float64), 10.0) if shape.num_cores > 2 else None
    cores = cores or _cores(shape, torch.float64)
    spectra = bond_spectra(cores)
    lossless = bonds_of(cores)
    caps = [max(1, b // 2) for b in lossless[1:-1]]
    cut, matrix = recompress(cores, shape, caps)
    assert all(b <= c for b, c in zip(cut.bonds[1:-1], caps, strict=True))
    assert [c.dtype for c in cut.cores] == [torch.float64] * len(cores)
    error = measured_error(cores, cut.cores, shape)
    if shape.out_padding or shape.in_padding:  # the cut also spends error on the padding
        assert error <= cut.predicted_error * (1 + 1e-10)
    else:
        assert cut.predicted_error == pytest.approx(error, rel=1e-10, abs=1e-14)
    assert error <= error_bound(spectra, cut.bonds) * (1 + 1e-10)  # the plan's bound holds
    expected = to_padded_matrix(cores)[: shape.out_dim, : shape.in_dim]
    assert relative_error(expected, matrix) < 1e-14  # the matrix the cores represent


# --- the stage, on a tiny model's real MPOs -------------------------------------------------


@pytest.fixture(scope="module", params=["float32", "float64"])
def tiny_art(request: pytest.FixtureRequest, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"cost-{request.param}") / "art"
    mposurgeon.decompose(tiny_model_dir("llama"), output=out, dtype=request.param)
    return out


def _exact_plan(art: Path, ratio: float, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple]:
    """Planned bonds per module from spectra of a canonical sweep (`bond_spectra`), as a dry
    run that ignores the spectra decompose recorded."""
    with monkeypatch.context() as patch:
        patch.setattr("mposurgeon.stages.truncate.record_spectra", lambda *_: None)
        patch.setattr("mposurgeon.stages.truncate.gram_spectra", bond_spectra)
        result = mposurgeon.truncate(art, param_ratio=ratio, dry_run=True)
    return {m.name: m.bonds for m in result.modules}


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_stage_plans_from_recorded_spectra_and_cuts_by_recompress(
    tiny_art: Path, ratio: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planned = _exact_plan(tiny_art, ratio, monkeypatch)
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:  # every module's spectra are the recorded ones
        patch.setattr("mposurgeon.stages.truncate.gram_spectra", _never)
        result = mposurgeon.truncate(tiny_art, output=out, param_ratio=ratio)
    assert {m.name: m.bonds for m in result.modules} == planned  # the exact spectra's plan
    before, after = read_manifest(tiny_art).modules, read_manifest(out).modules
    cut_bonds = 0
    with open_tensors(tiny_art) as old, open_tensors(out) as new:
        for name, rec in after.items():
            cores = [old.get(key) for key in before[name].core_keys()]
            stored = [new.get(key) for key in rec.core_keys()]
            if tuple(rec.bonds) == tuple(before[name].bonds):
                assert all(torch.equal(a, b) for a, b in zip(cores, stored, strict=True))
                assert rec.spectra == before[name].spectra  # still these cores'
                continue
            assert rec.spectra is None and f"{name}.mpo.spectra" not in new.keys()
            changed = zip(rec.bonds, before[name].bonds, strict=True)
            cut_bonds = max(cut_bonds, sum(a != b for a, b in changed))
            expected, _ = recompress(cores, rec.mpo_shape, list(planned[name][1:-1]))
            assert all(torch.equal(a, b) for a, b in zip(expected.cores, stored, strict=True))
            assert all(a.dtype == b.dtype for a, b in zip(cores, stored, strict=True))
            measured = measured_error(cores, stored, rec.mpo_shape)
            assert rec.rel_error == pytest.approx(measured, rel=1e-6), name
            assert rec.predicted_error == pytest.approx(measured, rel=1e-5), name
    assert cut_bonds >= 2  # modules with several bonds cut (the identity's general case)


def _never(*_: object) -> None:
    raise AssertionError("spectra computed where decompose recorded them")
