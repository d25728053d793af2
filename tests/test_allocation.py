"""Bond allocation (mpo.allocation) and gauge-free truncation, against exact expectations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mposurgeon.mpo import (
    MPOShape,
    bond_spectra,
    bonds_of,
    decompose,
    measured_error,
    num_params,
    relative_error,
    to_matrix,
    truncate,
)
from mposurgeon.mpo.allocation import BondProblem, allocate, cap_bonds, min_params, param_count

SHAPE = MPOShape(96, 48, (2, 3, 4, 2, 2), (2, 2, 3, 2, 2))


def matrix(seed: int, noise: float) -> Tensor:
    """A float64 matrix: a random MPO with bond dims <= 3 plus relative noise. Its bond spectra
    drop to the noise level after 3 values (noise 1.0: a nearly flat, incompressible matrix)."""
    gen = torch.Generator().manual_seed(seed)
    bonds = [min(b, 3) for b in SHAPE.full_bonds()]
    cores = [
        torch.randn(bonds[k], i, j, bonds[k + 1], generator=gen, dtype=torch.float64)
        for k, (i, j) in enumerate(zip(SHAPE.out_modes, SHAPE.in_modes, strict=True))
    ]
    w = to_matrix(cores, SHAPE)
    extra = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    return w + noise * extra * w.norm() / extra.norm()


def problem_of(w: Tensor) -> tuple[BondProblem, list[Tensor]]:
    cores = decompose(w, SHAPE).cores
    return BondProblem.from_cores(cores, bond_spectra(cores)), cores


def feasible(p: BondProblem, bonds: tuple[int, ...]) -> bool:
    return all(
        1 <= bonds[b] <= min(bonds[b - 1] * p.sites[b - 1], p.sites[b] * bonds[b + 1])
        for b in range(1, len(bonds) - 1)
    )


def naive_allocate(problems: list[BondProblem], target: int) -> list[tuple[int, ...]]:
    """The same greedy without a heap: rescan every candidate before each drop."""
    bonds = [list(p.start()) for p in problems]
    norms = [float(p.spectra[0].square().sum()) for p in problems]
    total = sum(p.params(b) for p, b in zip(problems, bonds, strict=True))
    while total > target:
        best = None
        for m, p in enumerate(problems):
            r = bonds[m]
            for b in range(1, p.num_bonds + 1):
                lowest = max(1, -(-r[b - 1] // p.sites[b - 1]), -(-r[b + 1] // p.sites[b]))
                if r[b] - 1 < lowest:
                    continue
                s = p.spectra[b - 1]
                cost = float(s[r[b] - 1] ** 2) / norms[m] if r[b] - 1 < s.numel() else 0.0
                saving = r[b - 1] * p.sites[b - 1] + p.sites[b] * r[b + 1]
                key = (cost / saving, m, b)
                if best is None or key < best[0]:
                    best = (key, saving)
        if best is None:
            break
        (_, m, b), saving = best
        bonds[m][b] -= 1
        total -= saving
    return [tuple(b) for b in bonds]


def test_param_count_matches_cores() -> None:
    _, cores = problem_of(matrix(0, 0.1))
    sites = [c.shape[1] * c.shape[2] for c in cores]
    assert param_count(sites, bonds_of(cores)) == num_params(cores)
    assert min_params(sites) == sum(sites)


def test_heap_greedy_equals_naive_greedy_and_hits_the_target() -> None:
    problems = [problem_of(matrix(seed, decay))[0] for seed, decay in [(0, 1.0), (1, 0.05)]]
    before = sum(p.params(p.bonds) for p in problems)
    for ratio in (0.9, 0.5, 0.2):
        target = round(ratio * before)
        fast = allocate(problems, target_params=target)
        assert fast == naive_allocate(problems, target)
        after = sum(p.params(b) for p, b in zip(problems, fast, strict=True))
        largest_step = max(2 * max(p.bonds) * max(p.sites) for p in problems)
        assert target - largest_step < after <= target
        assert all(feasible(p, b) for p, b in zip(problems, fast, strict=True))


def test_global_allocation_cuts_the_compressible_module_and_beats_a_uniform_split() -> None:
    flat, steep = problem_of(matrix(0, 1.0))[0], problem_of(matrix(1, 0.05))[0]
    before = flat.params(flat.bonds) + steep.params(steep.bonds)
    glob = allocate([flat, steep], target_params=before // 2)
    uniform = [allocate([p], target_params=p.params(p.bonds) // 2)[0] for p in (flat, steep)]

    def objective(plan: list[tuple[int, ...]]) -> float:
        return flat.error(plan[0]) ** 2 + steep.error(plan[1]) ** 2

    assert objective(glob) < 0.8 * objective(uniform)
    kept = [p.params(b) / p.params(p.bonds) for p, b in zip((flat, steep), glob, strict=True)]
    assert kept[1] < 0.5 < kept[0]  # the steeply decaying module gives up more


@pytest.mark.parametrize("tol", [0.02, 0.1, 0.4])
def test_rel_tol_keeps_the_bound_and_no_further_drop_fits(tol: float) -> None:
    p, _ = problem_of(matrix(2, 0.01))
    (plan,) = allocate([p], rel_tol=tol)
    assert p.error(plan) <= tol
    assert p.params(plan) < p.params(p.bonds)
    for b in range(1, p.num_bonds + 1):  # greedy is maximal: any one more allowed drop breaks it
        lower = list(plan)
        lower[b] -= 1
        if lower[b] >= 1 and feasible(p, tuple(lower)):
            assert p.error(tuple(lower)) > tol


def test_rel_tol_and_target_together_respect_both() -> None:
    p, _ = problem_of(matrix(3, 0.1))
    (plan,) = allocate([p], rel_tol=0.05, target_params=1)
    assert p.error(plan) <= 0.05 and p.params(plan) > 1


def test_cap_bonds_and_start_stay_feasible() -> None:
    p, _ = problem_of(matrix(4, 0.1))
    for cap in range(1, max(p.bonds) + 1):
        assert feasible(p, cap_bonds(p.start(), cap))
    spectra = tuple(s[: max(1, s.numel() // 2)] for s in p.spectra)  # shorter spectra clamp bonds
    start = BondProblem(spectra, p.sites, p.bonds).start()
    assert feasible(p, start) and all(
        r <= s.numel() for r, s in zip(start[1:-1], spectra, strict=True)
    )
    with pytest.raises(ValueError):
        allocate([p])


def test_predicted_error_is_exact_for_one_cut_bond_and_a_bound_for_several() -> None:
    p, cores = problem_of(matrix(5, 0.1))
    w = to_matrix(cores, SHAPE)
    tested = 0
    for b in range(1, p.num_bonds + 1):
        plan = list(p.bonds)
        while plan[b] > p.bonds[b] // 2 and feasible(p, (*plan[:b], plan[b] - 1, *plan[b + 1 :])):
            plan[b] -= 1
        if plan[b] == p.bonds[b]:
            continue  # saturated by a neighbour: cannot be cut alone
        tested += 1
        cut = truncate(cores, max_bond=plan[1:-1])
        assert bonds_of(cut.cores) == tuple(plan)
        measured = relative_error(w, to_matrix(cut.cores, SHAPE))
        assert measured == pytest.approx(p.error(tuple(plan)), abs=1e-10)
    assert tested >= 2
    plan = cap_bonds(p.bonds, 3)
    cut = truncate(cores, max_bond=plan[1:-1])
    measured = relative_error(w, to_matrix(cut.cores, SHAPE))
    assert measured <= cut.predicted_error + 1e-12 <= p.error(plan) + 1e-12
    assert measured < p.error(plan)  # several cut bonds: a strict bound here


def gauge_perturbed(cores: list[Tensor], seed: int) -> list[Tensor]:
    """Same matrix, other gauge: core_k G_k and G_k^-1 core_k+1 with random invertible G_k."""
    gen = torch.Generator().manual_seed(seed)
    out = [c.clone() for c in cores]
    for k in range(len(cores) - 1):
        r = out[k].shape[3]
        g = torch.eye(r, dtype=torch.float64) + 0.5 * torch.randn(
            r, r, generator=gen, dtype=torch.float64
        )
        out[k] = torch.tensordot(out[k], g, dims=1)
        out[k + 1] = torch.tensordot(torch.linalg.inv(g), out[k + 1], dims=1)
    return out


def test_truncating_perturbed_cores_equals_truncating_canonical_cores() -> None:
    w = matrix(6, 0.1)
    cores = decompose(w, SHAPE).cores
    noisy = [c + 1e-3 * torch.randn_like(c) for c in cores]  # "fine-tuned": a new matrix
    perturbed = gauge_perturbed(noisy, 7)
    assert measured_error(noisy, perturbed, SHAPE) < 1e-12
    canonical = decompose(to_matrix(noisy, SHAPE), SHAPE).cores  # fresh TT-SVD of that matrix
    for spectrum_a, spectrum_b in zip(
        bond_spectra(perturbed), bond_spectra(canonical), strict=True
    ):
        torch.testing.assert_close(spectrum_a, spectrum_b, rtol=1e-9, atol=1e-12)
    plan = allocate([BondProblem.from_cores(perturbed, bond_spectra(perturbed))], rel_tol=0.2)[0]
    for max_bond in (plan[1:-1], 5):
        a = truncate(perturbed, max_bond=max_bond)
        b = truncate(canonical, max_bond=max_bond)
        assert a.bonds == b.bonds
        assert measured_error(b.cores, a.cores, SHAPE) < 1e-10
        assert a.predicted_error == pytest.approx(b.predicted_error, rel=1e-9)
    # plain slicing of the perturbed cores (the research code's bug) is far worse
    sliced = [c[: min(c.shape[0], 5), :, :, : min(c.shape[3], 5)] for c in perturbed]
    best = truncate(perturbed, max_bond=5)
    assert measured_error(noisy, best.cores, SHAPE) < 0.5 * measured_error(noisy, sliced, SHAPE)


def test_minilm_sized_problem_reaches_every_target() -> None:
    """36 modules with bonds up to 192 (thousands of drops): every target is hit feasibly."""
    gen = torch.Generator().manual_seed(0)
    sites, bonds = (8, 16, 24, 16, 12), (1, 8, 128, 192, 12, 1)
    problems = [
        BondProblem(
            tuple(
                torch.sort(torch.rand(r, generator=gen, dtype=torch.float64), descending=True)[0]
                for r in bonds[1:-1]
            ),
            sites,
            bonds,
        )
        for _ in range(36)
    ]
    before = sum(p.params(bonds) for p in problems)
    for ratio in (0.05, 0.5):
        plan = allocate(problems, target_params=round(ratio * before))
        after = sum(p.params(b) for p, b in zip(problems, plan, strict=True))
        assert abs(after / before - ratio) < 0.001
        assert all(feasible(p, b) for p, b in zip(problems, plan, strict=True))
