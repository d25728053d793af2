"""MPO shapes: how a (out_dim, in_dim) matrix is factorized into modes, with zero padding.

A matrix W (out_dim, in_dim) is zero-padded at the end to (prod(out_modes), prod(in_modes)),
reshaped row-major to (I1..In, J1..Jn) and permuted to (I1, J1, ..., In, Jn). Core k has layout
(r_{k-1}, I_k, J_k, r_k) with r_0 = r_n = 1; `bonds_of` and `modes_of` read a core list's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mposurgeon.errors import ShapeError


@dataclass(frozen=True)
class MPOShape:
    """Dims of a matrix and the out/in modes of its MPO (padded sizes are the mode products)."""

    out_dim: int
    in_dim: int
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_modes", tuple(int(m) for m in self.out_modes))
        object.__setattr__(self, "in_modes", tuple(int(m) for m in self.in_modes))
        if self.out_dim < 1 or self.in_dim < 1:
            raise ShapeError(f"matrix dims must be positive, got {self.out_dim}x{self.in_dim}")
        modes = f"modes {_join(self.out_modes)} x {_join(self.in_modes)}"
        if not self.out_modes or len(self.out_modes) != len(self.in_modes):
            raise ShapeError(
                f"{modes}: out and in modes must be non-empty and of equal length",
                hint="give as many out modes as in modes, e.g. 4,4,8,6,4x3,4,4,4,4",
            )
        if min(self.out_modes + self.in_modes) < 1:
            raise ShapeError(f"{modes}: every mode must be >= 1")
        if self.padded_out < self.out_dim or self.padded_in < self.in_dim:
            raise ShapeError(
                f"{modes} give {self.padded_out}x{self.padded_in}, which cannot hold a "
                f"{self.out_dim}x{self.in_dim} matrix",
                hint="choose modes whose products are at least the matrix dims",
            )

    @property
    def num_cores(self) -> int:
        return len(self.out_modes)

    @property
    def padded_out(self) -> int:
        return math.prod(self.out_modes)

    @property
    def padded_in(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_padding(self) -> int:
        return self.padded_out - self.out_dim

    @property
    def in_padding(self) -> int:
        return self.padded_in - self.in_dim

    @property
    def central_index(self) -> int:
        """Index of the central core, (n-1)//2."""
        return (self.num_cores - 1) // 2

    def full_bonds(self) -> tuple[int, ...]:
        """Lossless bond dims (length n+1): r_k = min(prod_{i<=k} I_i J_i, prod_{i>k} I_i J_i)."""
        sites = [i * j for i, j in zip(self.out_modes, self.in_modes, strict=True)]
        return tuple(
            min(math.prod(sites[:k]), math.prod(sites[k:])) for k in range(self.num_cores + 1)
        )

    def check_cores(self, cores: Sequence[Any]) -> None:
        """Raise ShapeError unless cores (r, I_k, J_k, r') carry exactly these modes."""
        out_modes, in_modes = modes_of(cores)
        if (out_modes, in_modes) != (self.out_modes, self.in_modes):
            raise ShapeError(
                f"cores have modes {_join(out_modes)} x {_join(in_modes)}, expected "
                f"{_join(self.out_modes)} x {_join(self.in_modes)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "out_dim": self.out_dim,
            "in_dim": self.in_dim,
            "out_modes": list(self.out_modes),
            "in_modes": list(self.in_modes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MPOShape:
        return cls(
            int(data["out_dim"]),
            int(data["in_dim"]),
            tuple(data["out_modes"]),
            tuple(data["in_modes"]),
        )


def bonds_of(cores: Sequence[Any]) -> tuple[int, ...]:
    """Bond dims (r_0, ..., r_n), length n+1, of cores shaped (r_{k-1}, I_k, J_k, r_k)."""
    return (int(cores[0].shape[0]), *(int(core.shape[3]) for core in cores))


def modes_of(cores: Sequence[Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_modes, in_modes) of cores shaped (r_{k-1}, I_k, J_k, r_k)."""
    return tuple(int(c.shape[1]) for c in cores), tuple(int(c.shape[2]) for c in cores)


def _join(modes: Sequence[int]) -> str:
    return ",".join(str(m) for m in modes)


def _largest_prime_factor(value: int) -> int:
    largest, p = 1, 2
    while p * p <= value:
        while value % p == 0:
            largest, value = p, value // p
        p += 1
    return max(largest, value)


def _most_balanced(size: int, num_modes: int, bound: float) -> list[int] | None:
    """Factors (ascending) of `size` into num_modes factors <= bound with least log-variance."""
    if _largest_prime_factor(size) > bound:
        return None
    best: tuple[float, list[int]] | None = None

    def search(rest: int, count: int, low: int, chosen: list[int]) -> None:
        nonlocal best
        if count == 1:
            if low <= rest <= bound:
                factors = [*chosen, rest]
                score = sum(math.log(f) ** 2 for f in factors)
                if best is None or score < best[0] - 1e-12:
                    best = (score, factors)
            return
        f = low
        while f**count <= rest and f <= bound:
            if rest % f == 0:
                search(rest // f, count - 1, f, [*chosen, f])
            f += 1

    search(size, num_modes, 1, [])
    return None if best is None else best[1]


def _centre_largest(factors: Sequence[int]) -> tuple[int, ...]:
    """Place the largest factor at the central index, then alternate right/left outward."""
    n = len(factors)
    centre = (n - 1) // 2
    order = sorted(range(n), key=lambda p: (abs(p - centre), p < centre))
    modes = [0] * n
    for position, factor in zip(order, sorted(factors, reverse=True), strict=True):
        modes[position] = factor
    return tuple(modes)


def factorize(dim: int, num_modes: int, max_padding: float = 0.1) -> tuple[int, ...]:
    """Balanced modes whose product is the smallest size >= dim that factors well.

    A size factors well when its most balanced split into num_modes factors has no factor larger
    than max(2 * dim**(1/num_modes), 8). Sizes are tried upward from dim (no padding first) up to
    dim * (1 + max_padding); dims below 2**num_modes fall back to unit modes without padding.
    """
    if dim < 1 or num_modes < 1:
        raise ShapeError(f"cannot factorize {dim} into {num_modes} modes")
    bound = max(2.0 * dim ** (1.0 / num_modes), 8.0)
    for size in range(dim, math.floor(dim * (1.0 + max_padding)) + 1):
        factors = _most_balanced(size, num_modes, bound)
        if factors is not None:
            return _centre_largest(factors)
    if dim < 2**num_modes:
        factors = _most_balanced(dim, num_modes, float(dim))
        if factors is not None:
            return _centre_largest(factors)
    raise ShapeError(
        f"{dim} has no balanced factorization into {num_modes} modes within "
        f"{max_padding:.0%} padding",
        hint="give explicit modes (--modes OUTxIN) or allow more padding",
    )


def plan_shape(out_dim: int, in_dim: int, num_cores: int = 5) -> MPOShape:
    """Automatic balanced modes for a (out_dim, in_dim) matrix."""
    return MPOShape(out_dim, in_dim, factorize(out_dim, num_cores), factorize(in_dim, num_cores))


def parse_mode_spec(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Parse "4,4,8,6,4x3,4,4,4,4" into (out_modes, in_modes)."""
    example = "e.g. 4,4,8,6,4x3,4,4,4,4 (out modes x in modes)"
    sides = spec.lower().replace(" ", "").split("x")
    if len(sides) != 2:
        raise ShapeError(f"bad mode spec {spec!r}: expected OUTxIN", hint=example)
    try:
        out_modes, in_modes = (tuple(int(m) for m in side.split(",")) for side in sides)
    except ValueError:
        raise ShapeError(
            f"bad mode spec {spec!r}: modes must be comma-separated integers", hint=example
        ) from None
    if len(out_modes) != len(in_modes):
        raise ShapeError(
            f"bad mode spec {spec!r}: {len(out_modes)} out modes but {len(in_modes)} in modes",
            hint=example,
        )
    if min(out_modes + in_modes) < 1:
        raise ShapeError(f"bad mode spec {spec!r}: every mode must be >= 1", hint=example)
    return out_modes, in_modes


def shape_from_modes(
    out_dim: int,
    in_dim: int,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    max_padding: float = 0.1,
) -> MPOShape:
    """Validated MPOShape for explicit modes; padding beyond max_padding is refused."""
    shape = MPOShape(out_dim, in_dim, tuple(out_modes), tuple(in_modes))
    if shape.out_padding > max_padding * out_dim or shape.in_padding > max_padding * in_dim:
        raise ShapeError(
            f"modes {_join(shape.out_modes)} x {_join(shape.in_modes)} give "
            f"{shape.padded_out}x{shape.padded_in}, which pads a {out_dim}x{in_dim} matrix "
            f"by more than {max_padding:.0%}",
            hint="choose modes whose products are closer to the matrix dims",
        )
    return shape
