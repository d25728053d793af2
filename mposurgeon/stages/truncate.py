"""truncate: squeeze the bond dimensions of an artifact's MPO modules, without data.

The story: open and verify the artifact; get each module's bond spectra: those decompose
recorded (`MPORecord.spectra`), if the cores are still the ones it wrote (their fingerprint),
else from the cores (`gram_spectra`: the canonical spectra from Gram matrices, no canonical
sweep; gauge-free, so fine-tuned cores are handled exactly); plan new
bond dims: `--bond-pattern` overrides first, then one target over the other modules
(`--max-bond` caps every bond, `--rel-tol` keeps each module's error bound <= X with the fewest
parameters, `--param-ratio` keeps R of all MPO parameters and allocates bonds globally by the
smallest discarded singular-value mass per parameter, see `mposurgeon.mpo.allocation`). Then
stream the tensors into a new artifact, one module at a time: non-MPO tensors and unchanged
modules pass through, each changed module's cores are contracted into the matrix they
represent, which is decomposed again with the planned bonds as caps
(`mpo.decomposition.recompress`), and its error measured. The write is atomic.

Errors recorded for a truncated module are relative to the input MPO's matrix (not to the
original dense weight): `predicted_error` is sqrt(sum of discarded s^2) / ||W|| of the sweep
that cut it (exact in exact arithmetic, however many bonds are cut: a dry run's plan, from the
uncut spectra, only bounds it), `rel_error` ||W_in - W_out||_F / ||W_in||_F of the cores as
stored (`mpo.decomposition.truncation_error`: the cut cores contracted once and compared with
W_in, in float64 where float32 round-off would show). `truncated_from` keeps the bonds before
the cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from mposurgeon.artifact.manifest import MANIFEST_NAME
from mposurgeon.artifact.store import atomic_directory
from mposurgeon.artifact.tensors import ShardedWriter, TensorReader, open_tensors
from mposurgeon.errors import ArtifactError, UsageError
from mposurgeon.memory import bound_heap_growth, release_free_memory
from mposurgeon.methods.mpo.record import CORE_KEY, MPORecord, core_key
from mposurgeon.methods.mpo.state import record_cores, record_spectra
from mposurgeon.models.device import Device, compute_device, on_cpu
from mposurgeon.mpo.allocation import BondProblem, allocate, cap_bonds, min_params
from mposurgeon.mpo.decomposition import gram_spectra, recompress, truncation_error
from mposurgeon.mpo.metrics import entanglement_entropy, num_params
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    StageInput,
    StageOptions,
    check_no_dense_twin,
    finish_artifact,
    open_input,
    plan_output,
    tensor_shapes,
    verified_input,
)

TARGETS = ("max_bond", "rel_tol", "param_ratio")


class TruncateOptions(StageOptions):
    """Options of `truncate` (the CLI flags, one to one).

    bond_pattern: {regex: N}, or "REGEX=N" strings; each caps every bond of the modules whose
    name the regex fully matches (the first matching pattern wins). The target (max_bond,
    rel_tol or param_ratio) then applies to the other modules; param_ratio counts all modules.
    """

    max_bond: int | None = Field(None, ge=1, description="cap every bond")
    rel_tol: float | None = Field(None, gt=0.0, lt=1.0, description="error bound per module")
    param_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="fraction of the MPO parameters to keep"
    )
    bond_pattern: dict[str, int] = Field(default_factory=dict)
    device: Device = Field(
        "auto", description="where each module is cut: auto (a GPU when there is one)"
    )
    dry_run: bool = False

    @field_validator("bond_pattern", mode="before")
    @classmethod
    def _parse_patterns(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return dict(_parse_pattern(str(item)) for item in value)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> TruncateOptions:
        given = [name for name in TARGETS if getattr(self, name) is not None]
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        if len(given) > 1:
            raise UsageError(
                f"{flags} are alternative targets; give only one",
                hint="--bond-pattern RE=N may be combined with any one of them",
            )
        if not given and not self.bond_pattern:
            raise UsageError(
                "nothing to truncate to: give --max-bond N, --rel-tol X or --param-ratio R",
                hint="or cap chosen modules with --bond-pattern REGEX=N",
            )
        for regex, bond in self.bond_pattern.items():
            try:
                re.compile(regex)
            except re.error as err:
                raise UsageError(
                    f"--bond-pattern {regex}={bond}: bad regex ({err})",
                    hint="a Python regex matching whole module names, e.g. '.*attention.*=64'",
                ) from None
            if bond < 1:
                raise UsageError(f"--bond-pattern {regex}={bond}: bond dims must be >= 1")
        return self

    @property
    def target(self) -> str:
        """The target as the flags spell it, e.g. '--param-ratio 0.5'."""
        parts = [
            f"--{name.replace('_', '-')} {getattr(self, name)}"
            for name in TARGETS
            if getattr(self, name) is not None
        ]
        parts += [f"--bond-pattern {regex}={bond}" for regex, bond in self.bond_pattern.items()]
        return " ".join(parts)


def _parse_pattern(text: str) -> tuple[str, int]:
    regex, sep, bond = text.rpartition("=")
    if not sep or not regex:
        raise UsageError(
            f"bad --bond-pattern {text!r}: expected REGEX=N", hint="e.g. '.*attention.*=64'"
        )
    try:
        return regex, int(bond)
    except ValueError:
        raise UsageError(
            f"bad --bond-pattern {text!r}: {bond!r} is not an integer bond dimension",
            hint="e.g. '.*attention.*=64'",
        ) from None


@dataclass
class TruncatedModule:
    """One MPO module: bonds and parameters before and after (planned in a dry run),
    the error bound relative to the input MPO, and, after a real run, the measured error."""

    name: str
    shape: tuple[int, int]
    modes: tuple[tuple[int, ...], tuple[int, ...]]
    bonds_before: tuple[int, ...]
    params_before: int
    bonds: tuple[int, ...]
    params: int
    dense_params: int
    predicted_error: float
    rel_error: float | None = None
    entropy: list[float] = field(default_factory=list)
    rule: str = ""

    @property
    def changed(self) -> bool:
        return self.bonds != self.bonds_before


@dataclass
class TruncateResult:
    output: Path | None
    target: str
    modules: list[TruncatedModule] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.modules)

    @property
    def truncated(self) -> list[TruncatedModule]:
        return [m for m in self.modules if m.changed]


def truncate(
    artifact: str | Path,
    options: TruncateOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: Any,
) -> TruncateResult:
    """Lower the bond dims of the artifact's MPO modules; write a new artifact.

    `options` or keyword arguments (the same names as the CLI flags) configure the stage, e.g.
    `truncate("art", output="small", param_ratio=0.5)`.
    """
    opts = options or TruncateOptions(**kwargs)
    device = compute_device(opts.device)
    bound_heap_growth()
    inp = open_input(artifact, opts, defer_checksums=True)
    records = _mpo_records(inp)
    check_no_dense_twin(records, tensor_shapes(inp))
    with verified_input(inp):  # the input is hashed while the spectra are computed
        problems: dict[str, BondProblem] = {}
        with open_tensors(inp.path) as reader:
            for i, (name, rec) in enumerate(records.items()):
                problems[name] = _problem(rec, reader)
                if progress:
                    progress("spectra", i + 1, len(records))
        plan = _plan(records, problems, opts)
        result = TruncateResult(output=None, target=opts.target, modules=list(plan.values()))
        if opts.dry_run:
            return result

        out = plan_output(inp, opts, "truncate")
        with atomic_directory(out, overwrite=opts.overwrite) as tmp:
            with ShardedWriter(tmp, opts.shard_size(inp.path)) as writer:
                new_records = _write_truncated(inp.path, writer, records, plan, device, progress)
            unmeasured = [m.name for m in plan.values() if m.changed and m.rel_error is None]
            if unmeasured:  # its cores were not where the manifest says: publish nothing
                raise ArtifactError(
                    f"{MANIFEST_NAME} lists MPO module {unmeasured[0]}, whose cores the tensor "
                    "files do not hold under that name; nothing was written",
                    hint="re-create the artifact with the stage that made it, or restore it",
                )
            finish_artifact(
                tmp,
                inp=inp,
                stage="truncate",
                options=opts,
                modules=new_records,
                known_checksums=writer.checksums(),
                selection=inp.selection,
            )
    for module in result.modules:
        if not module.changed:
            module.rel_error = 0.0  # passed through as it was
    result.output = out
    return result


def _write_truncated(
    source: Path,
    writer: ShardedWriter,
    records: dict[str, MPORecord],
    plan: dict[str, TruncatedModule],
    device: torch.device,
    progress: ProgressCallback | None,
) -> dict[str, MPORecord]:
    """Stream `source`'s tensors to `writer`, truncating the changed modules' cores (on
    `device`) at their first core; return every module's record (new ones for the changed
    modules)."""
    new_records = dict(records)
    stale = {  # a changed module's fixup and spectra belong to the cores it had: dropped
        key for name, m in plan.items() if m.changed for key in records[name].derived_keys()
    }
    with open_tensors(source) as reader:
        keys = reader.keys()
        for i, key in enumerate(keys):
            match = CORE_KEY.fullmatch(key)
            module = plan.get(match["module"]) if match else None
            if key in stale:
                pass  # not written
            elif module is None or not module.changed:
                writer.add(key, reader.get(key))
            elif match is not None and match["index"] == "0":
                record, cores = _truncate_one(records[module.name], module, reader, device)
                new_records[module.name] = record
                for k, core in enumerate(cores):
                    writer.add(core_key(module.name, k), core)
                release_free_memory()  # this module's temporaries
            if progress:
                progress("truncate", i + 1, len(keys))
    return new_records


def _mpo_records(inp: StageInput) -> dict[str, MPORecord]:
    """The artifact's MPO modules; refuse an input without any."""
    if inp.manifest is None:
        raise UsageError(
            f"{inp.path} is not a mposurgeon artifact (no mposurgeon.json)",
            hint=f"run `mposurgeon decompose {inp.path}` first, then truncate its output",
        )
    records = inp.mpo_modules
    if not records:
        raise UsageError(
            f"{inp.path} has no MPO modules to truncate (stage {inp.manifest.stage})",
            hint="run `mposurgeon decompose` first",
        )
    return records


def _problem(rec: MPORecord, reader: TensorReader) -> BondProblem:
    """The allocation problem of one module: its cores' canonical spectra (those decompose
    recorded, if they hold for these cores, else `gram_spectra`), sites and bonds (only the
    spectra are kept: the cores are read again when cut)."""
    cores = record_cores(rec, reader)
    spectra = record_spectra(rec, reader, cores)
    return BondProblem.from_cores(cores, spectra if spectra is not None else gram_spectra(cores))


def _plan(
    records: dict[str, MPORecord], problems: dict[str, BondProblem], opts: TruncateOptions
) -> dict[str, TruncatedModule]:
    """New bonds per module: pattern overrides first, then the target over the rest."""
    names = list(records)
    bonds: dict[str, tuple[int, ...]] = {}
    rules: dict[str, str] = {}
    for regex, cap in opts.bond_pattern.items():
        compiled = re.compile(regex)
        matched = [n for n in names if compiled.fullmatch(n)]
        if not matched:
            raise UsageError(
                f"--bond-pattern {regex}={cap} matches no MPO module",
                hint=f"MPO modules: {_listing(names)} (the regex must match the whole name)",
            )
        for name in (n for n in matched if n not in rules):
            largest = _largest_bond(problems[name])
            if cap >= largest:
                raise UsageError(
                    f"--bond-pattern {regex}={cap} would not lower {name}: its largest bond is "
                    f"{largest} already",
                    hint=f"truncate only lowers bonds: choose N < {largest} or narrow the regex",
                )
            bonds[name] = cap_bonds(problems[name].start(), cap)
            rules[name] = f"{regex}={cap}"
    rest = [n for n in names if n not in rules and problems[n].num_bonds > 0]
    given = next((name for name in TARGETS if getattr(opts, name) is not None), None)
    if given is not None and not rest:
        raise UsageError(
            f"--{given.replace('_', '-')} has no module left to truncate: every MPO module is "
            "matched by --bond-pattern or has no inner bond",
            hint="drop the target, or narrow the --bond-pattern regexes",
        )
    if opts.max_bond is not None:
        _check_max_bond(opts.max_bond, {n: problems[n] for n in rest})
        for name in rest:
            bonds[name] = cap_bonds(problems[name].start(), opts.max_bond)
            rules[name] = f"max_bond={opts.max_bond}"
    elif opts.rel_tol is not None:
        chosen = allocate([problems[n] for n in rest], rel_tol=opts.rel_tol)
        for name, planned in zip(rest, chosen, strict=True):
            bonds[name], rules[name] = planned, f"rel_tol={opts.rel_tol}"
    elif opts.param_ratio is not None:
        chosen = _param_ratio_plan(opts.param_ratio, problems, bonds, rest)
        for name, planned in zip(rest, chosen, strict=True):
            bonds[name], rules[name] = planned, f"param_ratio={opts.param_ratio}"
    plan = {}
    for name, rec in records.items():
        problem = problems[name]
        planned = bonds.get(name, problem.bonds)
        plan[name] = TruncatedModule(
            name=name,
            shape=(rec.out_dim, rec.in_dim),
            modes=(tuple(rec.out_modes), tuple(rec.in_modes)),
            bonds_before=problem.bonds,
            params_before=problem.params(problem.bonds),
            bonds=planned,
            params=problem.params(planned),
            dense_params=rec.dense_params,
            predicted_error=problem.error(planned),
            entropy=_kept_entropy(problem.spectra, planned),
            rule=rules.get(name, ""),
        )
    return plan


def _kept_entropy(
    spectra: tuple[torch.Tensor, ...] | list[torch.Tensor], bonds: tuple[int, ...]
) -> list[float]:
    """Entanglement entropy of the kept part of each inner bond's spectrum."""
    return [entanglement_entropy(s[:r]) for s, r in zip(spectra, bonds[1:-1], strict=True)]


def _largest_bond(problem: BondProblem) -> int:
    return max(problem.bonds[1:-1], default=1)


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_max_bond(cap: int, problems: dict[str, BondProblem]) -> None:
    """Refuse a --max-bond that lowers nothing."""
    name, largest = max(
        ((n, _largest_bond(p)) for n, p in problems.items()), key=lambda item: item[1]
    )
    if cap >= largest:
        raise UsageError(
            f"--max-bond {cap} would not lower any bond: the largest is {largest} ({name})",
            hint=f"truncate only lowers bonds: choose N < {largest}",
        )


def _param_ratio_plan(
    ratio: float,
    problems: dict[str, BondProblem],
    fixed: dict[str, tuple[int, ...]],
    rest: list[str],
) -> list[tuple[int, ...]]:
    """Bonds of the `rest` modules so that all modules together keep `ratio` of their current
    parameters; modules in `fixed` (pattern overrides) count with their planned bonds."""
    before = sum(p.params(p.bonds) for p in problems.values())
    held = sum(
        p.params(fixed.get(name, p.bonds)) for name, p in problems.items() if name not in rest
    )
    target = round(ratio * before) - held
    floor = sum(min_params(problems[n].sites) for n in rest)
    if target < floor:
        reachable = (floor + held) / before
        raise UsageError(
            f"--param-ratio {ratio} is out of reach: with every bond 1 the modules keep "
            f"{reachable:.3g} of their {before:,} parameters",
            hint=f"choose a ratio of at least {reachable:.3g}",
        )
    return allocate([problems[n] for n in rest], target_params=target)


def _truncate_one(
    rec: MPORecord, module: TruncatedModule, reader: TensorReader, device: torch.device
) -> tuple[MPORecord, list[torch.Tensor]]:
    """Cut one module's cores to the planned bonds (`recompress` on `device`: TT-SVD of the
    matrix they represent); fill `module` with what was measured."""
    cores = [reader.get(key).to(device) for key in rec.core_keys()]  # found finite when planned
    shape = rec.mpo_shape
    cut, matrix = recompress(cores, shape, list(module.bonds[1:-1]))
    new = on_cpu(cut.cores)
    module.bonds = tuple(cut.bonds)
    module.params = num_params(new)
    module.predicted_error = cut.predicted_error
    module.rel_error = truncation_error(cores, matrix, cut, shape)
    module.entropy = _kept_entropy(cut.spectra, cut.bonds)
    record = MPORecord.model_validate(
        {
            **rec.model_dump(),
            "bonds": list(module.bonds),
            "params": module.params,
            "predicted_error": module.predicted_error,
            "rel_error": module.rel_error,
            "entropy": module.entropy,
            "truncated_from": list(module.bonds_before),
            "fixup": None,
            "spectra": None,
        }
    )
    return record, new
