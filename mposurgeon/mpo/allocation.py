"""Bond-dimension allocation for MPO truncation: which singular values to drop, where.

A module is described by its canonical bond spectra s_b (b = 1..n-1, descending, float64 as
`bond_spectra` returns them), its site sizes d_k = I_k * J_k (k = 0..n-1) and its bond dims
(r_0, ..., r_n), r_0 = r_n = 1; it holds sum_k r_k d_k r_{k+1} parameters.

Lowering inner bond b by one unit drops its smallest kept singular value s_b[r_b - 1]:
- cost: s_b[r_b - 1]^2 / ||W||^2, the unit's term in the squared relative error bound
  sum_b sum_{i >= r_b} s_b[i]^2 / ||W||^2 (`metrics.error_bound`). Normalizing by the module's
  own ||W||^2 makes modules of different scale comparable: the global allocation minimizes the
  sum of the modules' squared relative error bounds;
- saving: r_{b-1} d_{b-1} + d_b r_{b+1} parameters, given the neighbours' current dims.

`allocate` is a greedy on cost per parameter saved, kept exact with a heap and lazy
invalidation: after a drop at bond b only the entries of bonds b-1, b, b+1 of that module change
and are pushed again. Bonds stay feasible, r_b <= r_{b-1} d_{b-1} and r_b <= d_b r_{b+1}
(a larger bond is not realizable and would shrink on canonicalization, making the parameter
count a lie), by refusing a drop that would break the constraint of a neighbour: that
neighbour must shrink first.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from mposurgeon.mpo.metrics import error_bound
from mposurgeon.mpo.shapes import bonds_of, modes_of

# A --rel-tol plan keeps its bound strictly inside the budget despite summation round-off.
_BUDGET_SLACK = 1.0 - 1e-12


@dataclass(frozen=True)
class BondProblem:
    """One module to allocate: spectra (n-1 descending tensors; spectra[0] untruncated, so that
    sum(spectra[0]^2) = ||W||^2), sites (n ints, I_k * J_k) and bonds (n+1 ints, current)."""

    spectra: tuple[Tensor, ...]
    sites: tuple[int, ...]
    bonds: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.sites)
        if len(self.spectra) != n - 1 or len(self.bonds) != n + 1:
            raise ValueError(
                f"{n} sites need {n - 1} spectra and {n + 1} bonds, "
                f"got {len(self.spectra)} and {len(self.bonds)}"
            )

    @classmethod
    def from_cores(cls, cores: Sequence[Tensor], spectra: Sequence[Tensor]) -> BondProblem:
        """The problem of cores (r_{k-1}, I_k, J_k, r_k) with their `bond_spectra`."""
        out_modes, in_modes = modes_of(cores)
        sites = tuple(i * j for i, j in zip(out_modes, in_modes, strict=True))
        return cls(tuple(spectra), sites, bonds_of(cores))

    @property
    def num_bonds(self) -> int:
        """Number of inner bonds, n-1."""
        return len(self.sites) - 1

    def start(self) -> tuple[int, ...]:
        """Feasible bonds to start from: the current ones, each inner bond at most its spectrum's
        length and the rank bounds of its neighbours (what canonicalization would leave)."""
        bonds = list(self.bonds)
        for b in range(1, len(bonds) - 1):
            bonds[b] = min(bonds[b], self.spectra[b - 1].numel(), bonds[b - 1] * self.sites[b - 1])
        for b in range(len(bonds) - 2, 0, -1):
            bonds[b] = min(bonds[b], self.sites[b] * bonds[b + 1])
        return tuple(max(b, 1) for b in bonds)

    def params(self, bonds: Sequence[int]) -> int:
        """sum_k r_k d_k r_{k+1} for bonds (r_0, ..., r_n)."""
        return param_count(self.sites, bonds)

    def error(self, bonds: Sequence[int]) -> float:
        """Relative Frobenius error bound of cutting to bonds (exact when one bond is cut)."""
        return error_bound(self.spectra, bonds)


def param_count(sites: Sequence[int], bonds: Sequence[int]) -> int:
    """sum_k r_k d_k r_{k+1} for site sizes (d_0..d_{n-1}) and bonds (r_0..r_n)."""
    return sum(bonds[k] * d * bonds[k + 1] for k, d in enumerate(sites))


def min_params(sites: Sequence[int]) -> int:
    """Parameters with every bond 1: the smallest any allocation can reach."""
    return sum(sites)


def cap_bonds(bonds: Sequence[int], cap: int) -> tuple[int, ...]:
    """Every inner bond lowered to at most `cap` (>= 1). Feasible bonds stay feasible: with
    r_b <= d_b r_{b+1}, min(r_b, cap) <= d_b min(r_{b+1}, cap) (and symmetrically)."""
    if cap < 1:
        raise ValueError(f"bond cap must be >= 1, got {cap}")
    return (bonds[0], *(min(r, cap) for r in bonds[1:-1]), bonds[-1])


def allocate(
    problems: Sequence[BondProblem],
    *,
    target_params: int | None = None,
    rel_tol: float | None = None,
) -> list[tuple[int, ...]]:
    """Bonds per problem, lowered greedily by the smallest cost per parameter saved.

    target_params: stop once the total parameter count is <= target_params (one global budget
    over all problems; it overshoots by at most one drop's saving). rel_tol: never let a
    problem's error bound exceed rel_tol; a drop that would is skipped and its bond frozen
    (later drops of that bond cost more). Without target_params, drop all that rel_tol allows.
    """
    if target_params is None and rel_tol is None:
        raise ValueError("give target_params, rel_tol or both")
    bonds = [list(p.start()) for p in problems]
    # squared singular values normalized by ||W||^2, as Python floats for the inner loop
    costs: list[list[list[float]]] = []
    budgets: list[float] = []
    for p, start in zip(problems, bonds, strict=True):
        norm2 = float(p.spectra[0].double().square().sum()) if p.spectra else 0.0
        scale = 1.0 / norm2 if norm2 > 0 else 0.0
        costs.append([(s.double().square() * scale).tolist() for s in p.spectra])
        spent = p.error(start) ** 2 if p.spectra else 0.0
        allowed = math.inf if rel_tol is None else rel_tol**2 * _BUDGET_SLACK
        budgets.append(allowed - spent)
    total = sum(p.params(b) for p, b in zip(problems, bonds, strict=True))
    version = [[0] * (p.num_bonds + 2) for p in problems]
    frozen = [[False] * (p.num_bonds + 2) for p in problems]
    heap: list[tuple[float, int, int, int]] = []

    def drop(m: int, b: int) -> tuple[float, int] | None:
        """(cost, saving) of lowering bond b of problem m by one, or None if not allowed."""
        r, sites = bonds[m], problems[m].sites
        lowest = max(1, -(-r[b - 1] // sites[b - 1]), -(-r[b + 1] // sites[b]))
        if r[b] - 1 < lowest:
            return None
        spectrum = costs[m][b - 1]
        cost = spectrum[r[b] - 1] if r[b] - 1 < len(spectrum) else 0.0
        return cost, r[b - 1] * sites[b - 1] + sites[b] * r[b + 1]

    def push(m: int, b: int) -> None:
        if not 1 <= b <= problems[m].num_bonds or frozen[m][b]:
            return
        version[m][b] += 1
        step = drop(m, b)
        if step is not None:
            heapq.heappush(heap, (step[0] / step[1], m, b, version[m][b]))

    for m, p in enumerate(problems):
        for b in range(1, p.num_bonds + 1):
            push(m, b)
    while heap and (target_params is None or total > target_params):
        _, m, b, ver = heapq.heappop(heap)
        if ver != version[m][b]:
            continue
        step = drop(m, b)
        if step is None:  # cannot happen: entries are re-pushed whenever a neighbour changes
            continue
        cost, saving = step
        if cost > budgets[m]:
            frozen[m][b] = True
            continue
        budgets[m] -= cost
        bonds[m][b] -= 1
        total -= saving
        for neighbour in (b - 1, b, b + 1):
            push(m, neighbour)
    return [tuple(b) for b in bonds]
