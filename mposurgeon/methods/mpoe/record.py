"""The record of one feed-forward matrix upcycled to an MPO mixture of experts.

Files hold, for a module M with E experts and cores 0..n-1 (central core c): `M.mpoe.central`
(once, shared by the experts), `M.mpoe.experts.<e>.<k>` for every expert e and core k != c, and
`M.bias` (the matrix's bias, shared, where it has one). The record of the block's first `in`
matrix also owns the block's router, `<block>.mpoe_router.weight` (E, router_in), where <block>
is M without its last `router_depth` name parts. Everything else (cores' modes, bonds,
padding) is as in an MPO record.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt, model_validator

from mposurgeon.methods.mpo.record import FactorizedRecord
from mposurgeon.methods.records import raise_problems

#: Tensor names of MPOE state: `<module>.mpoe.central`, `<module>.mpoe.experts.<e>.<k>`.
MPOE_KEY = re.compile(r"(?P<module>.+)\.mpoe\.(?:central|experts\.\d+\.\d+)")
#: A router's weight: `<block>.mpoe_router.weight`.
ROUTER_KEY = re.compile(r"(?P<module>.+\.mpoe_router)\.weight")


class MPOERecord(FactorizedRecord):
    """A matrix as E experts sharing its central core (see the module doc)."""

    method: Literal["mpoe"] = "mpoe"
    experts: PositiveInt
    role: Literal["in", "out"]
    top_k: PositiveInt = 1
    gate: Literal["normalized", "switch"] = "normalized"
    capacity_factor: float = 1.0
    router_jitter: NonNegativeFloat = 0.0
    router_depth: PositiveInt
    router_in: PositiveInt
    owns_router: bool = False

    @property
    def router(self) -> str:
        """The live or file name (as `name` is) of the block's router module."""
        return ".".join(self.name.split(".")[: -self.router_depth] + ["mpoe_router"])

    def central_key(self) -> str:
        return f"{self.name}.mpoe.central"

    def expert_key(self, expert: int, core: int) -> str:
        return f"{self.name}.mpoe.experts.{expert}.{core}"

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.central_index
        core = dict(enumerate(self.core_shapes()))
        shapes = {self.central_key(): core[c]}
        for e in range(self.experts):
            for k in core:
                if k != c:
                    shapes[self.expert_key(e, k)] = core[k]
        if self.owns_router:
            shapes[f"{self.router}.weight"] = (self.experts, self.router_in)
        return shapes

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = MPOE_KEY.fullmatch(key) or ROUTER_KEY.fullmatch(key)
        return match["module"] if match else None

    @model_validator(mode="after")
    def _experts_consistent(self) -> MPOERecord:
        problems: list[tuple[str, str]] = []
        if len(self.out_modes) < 2:
            problems.append(("out_modes", "an MPOE matrix needs two cores or more"))
        if self.top_k > self.experts:
            problems.append(("top_k", f"{self.top_k} is more than the {self.experts} experts"))
        if self.gate == "switch" and self.top_k != 1:
            problems.append(("gate", "switch gates route to one expert (top_k 1)"))
        if self.router_depth >= len(self.name.split(".")):
            problems.append(("router_depth", f"{self.router_depth} leaves no block of {self.name}"))
        raise_problems(problems)
        return self
