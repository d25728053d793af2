"""The record of a module held as MPO cores (`M.mpo.core.0 ... M.mpo.core.{n-1}`).

Written by decompose, truncate and every method that trains MPO cores (full, lightweight,
overparam). Modes multiply to the padded dimensions (`prod(out_modes) == out_dim +
out_padding`); core k has shape (bonds[k], out_modes[k], in_modes[k], bonds[k + 1]).

A module decomposed from half-precision weights into wider cores may own two more tensors, its
rounding fixup (`fixup`): `M.mpo.fixup.index` (int64 flat indices into the (out_dim, in_dim)
matrix) and `M.mpo.fixup.value` (the original entries, in `dtype`), which make the cores'
contraction rounded to `dtype` bitwise the original weight. It holds for the cores whose
fingerprint it records only: a stage that writes other cores drops it (or leaves it to be
ignored: merge and `load_model` check the fingerprint).

A module that decompose cut nothing from (a lossless decompose into float32 or float64 cores)
also stores its bond spectra (`spectra`): `M.mpo.spectra`, float64, the descending singular
values of every inner bond's unfolding of the decomposed matrix, bond after bond (as many as
the bond's dimension: nothing was cut), which `truncate` plans from instead of computing them
again. Like the fixup, they hold for the cores whose fingerprint they record only.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from mposurgeon.methods.records import ModuleRecord, raise_problems
from mposurgeon.mpo.shapes import MPOShape

#: The tensor names of MPO cores: `<module>.mpo.core.<index>`.
CORE_KEY = re.compile(r"(?P<module>.+)\.mpo\.core\.(?P<index>\d+)")

#: The tensor names of an MPO's rounding fixup: `<module>.mpo.fixup.index` and `.value`.
FIXUP_KEY = re.compile(r"(?P<module>.+)\.mpo\.fixup\.(?P<part>index|value)")

#: The tensor names of an MPO's recorded bond spectra: `<module>.mpo.spectra`.
SPECTRA_KEY = re.compile(r"(?P<module>.+)\.mpo\.spectra")


def core_key(module: str, index: int) -> str:
    """The tensor name of core `index` of the MPO of module `module`."""
    return f"{module}.mpo.core.{index}"


class FactorizedRecord(ModuleRecord):
    """The structure and errors of a matrix's MPO, whatever holds the cores (`MPORecord`:
    one MPO; MPOE: experts sharing its central core)."""

    out_dim: PositiveInt
    in_dim: PositiveInt
    out_modes: list[PositiveInt]
    in_modes: list[PositiveInt]
    out_padding: NonNegativeInt
    in_padding: NonNegativeInt
    bonds: list[PositiveInt]
    central_index: int
    rel_error: float | None = None
    predicted_error: float | None = None
    entropy: list[float] = []

    @property
    def num_cores(self) -> int:
        return len(self.out_modes)

    @property
    def mpo_shape(self) -> MPOShape:
        """The matrix dims and modes of this module's MPO."""
        return MPOShape(self.out_dim, self.in_dim, tuple(self.out_modes), tuple(self.in_modes))

    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        """Each core's shape, (bonds[k], out_modes[k], in_modes[k], bonds[k + 1])."""
        b = self.bonds
        return [
            (b[k], self.out_modes[k], self.in_modes[k], b[k + 1]) for k in range(self.num_cores)
        ]

    @model_validator(mode="after")
    def _consistent(self) -> FactorizedRecord:
        n = len(self.out_modes)
        problems: list[tuple[str, str]] = []
        if len(self.in_modes) != n or n == 0:
            problems.append(
                (
                    "in_modes",
                    f"out_modes {self.out_modes} and in_modes {self.in_modes} differ in length",
                )
            )
        if len(self.bonds) != n + 1:
            problems.append(("bonds", f"{self.bonds} should have {n + 1} entries"))
        elif self.bonds[0] != 1 or self.bonds[-1] != 1:
            problems.append(("bonds", f"{self.bonds} should start and end with 1"))
        if not 0 <= self.central_index < max(n, 1):
            problems.append(("central_index", f"{self.central_index} is not a core index"))
        if self.out_modes and math.prod(self.out_modes) != self.out_dim + self.out_padding:
            problems.append(
                ("out_modes", f"{self.out_modes} do not multiply to out_dim + out_padding")
            )
        if self.in_modes and math.prod(self.in_modes) != self.in_dim + self.in_padding:
            problems.append(("in_modes", f"{self.in_modes} do not multiply to in_dim + in_padding"))
        problems += self.check_weight(self.out_dim, self.in_dim)
        raise_problems(problems)
        return self


class FixupRecord(BaseModel):
    """A module's rounding fixup: `count` entries, valid for the cores whose sha256
    fingerprint (`models.layers.cores_fingerprint`: dtypes, shapes and bytes) is
    `cores_sha256`."""

    model_config = ConfigDict(extra="allow")

    count: PositiveInt
    cores_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SpectraRecord(BaseModel):
    """A module's recorded bond spectra: `bonds[b]` singular values at each inner bond b (its
    full spectrum), one float64 tensor in all, valid for the cores whose sha256 fingerprint is
    `cores_sha256`."""

    model_config = ConfigDict(extra="allow")

    cores_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class MPORecord(FactorizedRecord):
    """One weight matrix held as MPO cores, with the structure and errors of its MPO, and its
    rounding fixup and recorded bond spectra if it has them."""

    method: Literal["mpo"] = "mpo"
    trainable: list[int] = []
    fixup: FixupRecord | None = None
    spectra: SpectraRecord | None = None

    def core_keys(self) -> list[str]:
        """The tensor names of this module's cores, in order."""
        return [core_key(self.name, k) for k in range(self.num_cores)]

    def fixup_keys(self) -> list[str]:
        """The tensor names of the fixup's indices and values (none without a fixup)."""
        if self.fixup is None:
            return []
        return [f"{self.name}.mpo.fixup.index", f"{self.name}.mpo.fixup.value"]

    def spectra_keys(self) -> list[str]:
        """The tensor name of the recorded spectra (none without them)."""
        return [] if self.spectra is None else [f"{self.name}.mpo.spectra"]

    def derived_keys(self) -> list[str]:
        """The tensors that hold for these cores only (fixup, spectra): a stage that writes
        other cores for the module drops them."""
        return self.fixup_keys() + self.spectra_keys()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each core's tensor name and the shape its bonds and modes give, cores first;
        then the fixup's two tensors, (count,) each, and the spectra's, (sum of inner bonds,)."""
        shapes = dict(zip(self.core_keys(), self.core_shapes(), strict=True))
        if self.fixup is not None:
            shapes |= {key: (self.fixup.count,) for key in self.fixup_keys()}
        if self.spectra is not None:
            shapes |= {key: (sum(self.bonds[1:-1]),) for key in self.spectra_keys()}
        return shapes

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = CORE_KEY.fullmatch(key) or FIXUP_KEY.fullmatch(key) or SPECTRA_KEY.fullmatch(key)
        return match["module"] if match else None

    @model_validator(mode="after")
    def _trainable_cores(self) -> MPORecord:
        n = self.num_cores
        if any(not 0 <= i < n for i in self.trainable):
            raise_problems([("trainable", f"{self.trainable} names cores outside 0..{n - 1}")])
        if self.fixup is not None and self.fixup.count > self.out_dim * self.in_dim:
            raise_problems(
                [("fixup", f"{self.fixup.count} entries in a {self.out_dim}x{self.in_dim} matrix")]
            )
        return self
