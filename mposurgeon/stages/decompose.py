"""decompose: factorize selected weight matrices of a checkpoint into MPO cores.

The story: resolve the input; find the target modules in the layout of a `meta` model built
from the config (no weights loaded; the layout is cached per config); plan each target's modes
(validated before any work); then stream the checkpoint tensor by tensor into a new artifact,
replacing each target weight `M.weight` by cores `M.mpo.core.k` and recording the measured
error. The write is atomic.

Half-precision weights get float32 cores by default, and the errors of the weights merge
writes (the contraction rounded once). A lossless decompose also stores the few entries that
rounding misses (the module's rounding fixup, `MPORecord.fixup`), so merge gives every weight
back bitwise. A module nothing was cut from keeps its bond spectra (`MPORecord.spectra`), from
which `truncate` plans without computing them again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from mposurgeon.artifact.store import atomic_directory
from mposurgeon.artifact.tensors import ShardedWriter, open_tensors
from mposurgeon.errors import ArtifactError, ShapeError, UsageError
from mposurgeon.memory import bound_heap_growth, release_free_memory
from mposurgeon.methods.config import ModuleRegex, WeightGroups
from mposurgeon.methods.mpo.record import FixupRecord, MPORecord, SpectraRecord, core_key
from mposurgeon.methods.mpo.state import FactorizedMatrix, factorize_weight, mpo_record
from mposurgeon.models.device import Device, compute_device, on_cpu
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.layers import (
    HALF_DTYPES,
    Fixup,
    cores_fingerprint,
    rounded_error,
    rounding_fixup,
)
from mposurgeon.models.orientation import as_matrix
from mposurgeon.mpo.shapes import MPOShape, parse_mode_spec, plan_shape, shape_from_modes
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    FLOAT_DTYPES,
    StageInput,
    StageOptions,
    check_mpo_records,
    finish_artifact,
    model_layout,
    open_input,
    plan_output,
    tensor_shapes,
    verified_input,
)

DEFAULT_LAYERS = ["FFN_1", "FFN_2", "attention"]

#: The largest share of a half-precision matrix's entries a rounding fixup may hold (10
#: bytes each, int64 index and value). A lossless decompose into float32 cores needs ~2.5e-3
#: of a Llama-sized matrix's (0.6% of the cores' bytes), up to ~10% of a tiny matrix with
#: outliers, and more than this of some (`rounding_fixup` then keeps the entries rounded
#: wrong and the nearest a boundary); truncated cores, or half-precision ones
#: (`--dtype keep`), get none.
MAX_FIXUP_FRACTION = 0.25


class DecomposeOptions(StageOptions):
    """Options of `decompose` (the CLI flags, one to one)."""

    layers: WeightGroups = Field(None, description="weight groups, e.g. FFN_1,attention")
    target_modules: ModuleRegex = Field(None, description="regex, full match on module names")
    exclude_modules: ModuleRegex = None
    num_cores: int = Field(5, ge=2, le=64)
    modes: list[str] = Field(default_factory=lambda: ["auto"])
    max_bond: int | None = Field(None, ge=1)
    rel_tol: float | None = Field(None, gt=0.0, lt=1.0)
    dtype: Literal["auto", "keep", "float32", "float64"] = Field(
        "auto",
        description="core dtype. auto: float32 for float16/bfloat16 weights, else the "
        "weight's own. Half-precision weights in wider cores (auto, float32, float64): a "
        "lossless decompose stores the few entries the rounded contraction misses (a rounding "
        "fixup, ~1e-3 of the entries), so merge gives the weights back bitwise and rel_error "
        "is 0.0. keep: the weight's dtype; half-precision cores are then off by their rounding "
        "(~4e-3 for bfloat16), no fixup can repair that, and rel_error and predicted_error "
        "include it",
    )
    device: Device = Field(
        "auto", description="where each matrix is factorized: auto (a GPU when there is one)"
    )
    dry_run: bool = False

    @field_validator("modes", mode="before")
    @classmethod
    def _modes_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


@dataclass
class PlannedModule:
    """One target with its planned (dry run) or measured (real run) factorization."""

    target: Target
    shape: MPOShape
    bonds: tuple[int, ...]
    params: int
    record: MPORecord | None = None


@dataclass
class DecomposeResult:
    output: Path | None
    modules: list[PlannedModule] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def mpo_params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def dense_params(self) -> int:
        return sum(m.target.out_dim * m.target.in_dim for m in self.modules)


def decompose(
    model: str | Path,
    options: DecomposeOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> DecomposeResult:
    """Factorize the chosen weight matrices of `model` into MPO cores; write a new artifact.

    `options` or keyword arguments (the same names as the CLI flags) configure the stage.
    """
    opts = options or DecomposeOptions(**kwargs)
    device = compute_device(opts.device)
    bound_heap_growth()
    inp = open_input(model, opts, defer_checksums=True)
    with verified_input(inp):  # an artifact input is hashed while the work runs
        targets, skipped = _find_targets(inp, opts)
        specs = _parse_specs(opts.modes)
        plan = [_plan(t, _shape_for(t, specs, opts.num_cores), opts.max_bond) for t in targets]
        if opts.dry_run:
            return DecomposeResult(output=None, modules=plan, skipped=skipped)

        out = plan_output(inp, opts, "decompose")
        with atomic_directory(out, overwrite=opts.overwrite) as tmp:
            with ShardedWriter(tmp, opts.shard_size(inp.path)) as writer:
                records = _write_decomposed(inp.path, writer, plan, opts, device, progress)
            finish_artifact(
                tmp,
                inp=inp,
                stage="decompose",
                options=opts,
                modules={**inp.mpo_modules, **records},
                known_checksums=writer.checksums(),
                selection=inp.selection,
            )
    return DecomposeResult(output=out, modules=plan, skipped=skipped)


def _write_decomposed(
    source: Path,
    writer: ShardedWriter,
    plan: list[PlannedModule],
    opts: DecomposeOptions,
    device: torch.device,
    progress: ProgressCallback | None,
) -> dict[str, MPORecord]:
    """Stream `source`'s tensors to `writer`, replacing each planned weight by its cores
    (factorized on `device`); return the new modules' records (and fill each
    `PlannedModule.record`)."""
    by_key = {p.target.weight_key: p for p in plan}
    records: dict[str, MPORecord] = {}
    with open_tensors(source) as reader:
        keys = reader.keys()
        for i, key in enumerate(keys):
            planned = by_key.get(key)
            if planned is None:
                writer.add(key, reader.get(key))
            else:
                _decompose_one(planned, reader.get(key), opts, device, writer)
                records[planned.target.name] = planned.record  # type: ignore[assignment]
            if progress:
                progress("decompose", i + 1, len(keys))
    return records


def _find_targets(inp: StageInput, opts: DecomposeOptions) -> tuple[list[Target], list[str]]:
    """The modules to decompose, and the requested ones that are already MPO (skipped)."""
    shapes = tensor_shapes(inp)
    layout = model_layout(inp.path, shapes)
    done = inp.mpo_modules
    check_mpo_records(layout, done, shapes)
    # Decomposed modules count as present so that groups still match them.
    file_keys = set(shapes) | {rec.weight_key for rec in done.values()}
    layers, target_modules = opts.layers, opts.target_modules
    if layers is None and target_modules is None:
        selection = inp.selection
        if selection is not None and selection.has_choice:
            if not selection.chosen:
                raise UsageError(
                    f"the selection recorded in {inp.path} chose no module (top_n 0)",
                    hint="give --layers or --target-modules to decompose anyway",
                )
            target_modules = "|".join(re.escape(name) for name in selection.chosen)
        else:
            layers = DEFAULT_LAYERS
    targets = select_targets(
        layout,
        file_keys,
        layers=layers,
        target_modules=target_modules,
        exclude_modules=opts.exclude_modules,
    )
    skipped = [t.name for t in targets if t.name in done]
    todo = [t for t in targets if t.name not in done]
    if not todo:
        raise UsageError(
            f"every selected module is already decomposed in {inp.path} ({len(skipped)})",
            hint="use `mposurgeon truncate` to change bond dimensions, or select other modules",
        )
    _check_dtypes(inp.path, todo)
    return todo, skipped


def _check_dtypes(source: Path, targets: list[Target]) -> None:
    """Refuse targets whose stored weights are not floating point (from the file headers)."""
    with open_tensors(source) as reader:
        for target in targets:
            dtype = reader.dtype(target.weight_key)
            if dtype not in FLOAT_DTYPES.values():
                name = str(dtype).removeprefix("torch.")
                raise UsageError(
                    f"{target.weight_key} holds {name} weights, which cannot be factorized "
                    "(decompose takes float16, bfloat16, float32 and float64)",
                    hint="leave it out with --exclude-modules, or convert the checkpoint to float",
                )


def _parse_specs(modes: list[str]) -> tuple[bool, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """(auto allowed, explicit OUTxIN specs) from the --modes values."""
    auto = any(m.strip() == "auto" for m in modes)
    specs = [parse_mode_spec(m) for m in modes if m.strip() != "auto"]
    return (auto or not specs), specs


def _shape_for(
    target: Target,
    specs: tuple[bool, list[tuple[tuple[int, ...], tuple[int, ...]]]],
    num_cores: int,
) -> MPOShape:
    """The first explicit spec that holds the matrix exactly, else one that holds it with
    padding, else the automatic factorization (if allowed)."""
    auto, explicit = specs
    out_dim, in_dim = target.out_dim, target.in_dim
    exact = [s for s in explicit if _prod(s[0]) == out_dim and _prod(s[1]) == in_dim]
    padded = [s for s in explicit if _prod(s[0]) >= out_dim and _prod(s[1]) >= in_dim]
    for out_modes, in_modes in exact + padded:
        try:
            return shape_from_modes(out_dim, in_dim, out_modes, in_modes)
        except ShapeError:
            continue
    if auto:
        return plan_shape(out_dim, in_dim, num_cores)
    given = ", ".join(f"{_fmt(o)}x{_fmt(i)} ({_prod(o)}x{_prod(i)})" for o, i in explicit)
    raise ShapeError(
        f"no --modes spec fits {target.name} ({out_dim}x{in_dim}); given: {given}",
        hint=f"add a spec whose modes multiply to {out_dim} and {in_dim}, or add --modes auto",
    )


def core_dtype(option: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the cores of a `weight_dtype` weight under `--dtype option` (auto, keep,
    float32 or float64): auto is float32 for half-precision weights, the weight's otherwise."""
    if option == "keep" or (option == "auto" and weight_dtype not in HALF_DTYPES):
        return weight_dtype
    if option == "auto":
        return torch.float32
    return getattr(torch, option)


def _recordable_spectra(
    factorized: FactorizedMatrix, fingerprint: str
) -> tuple[SpectraRecord, torch.Tensor] | None:
    """The record and tensor of the bond spectra truncate can plan from: those of a
    factorization that cut nothing (each spectrum is then the full singular values of the
    matrix's unfolding at that bond) into float32 or float64 cores; None otherwise."""
    wide = factorized.cores[0].dtype in (torch.float32, torch.float64)
    if factorized.predicted_error != 0.0 or not wide or not factorized.spectra:
        return None
    record = SpectraRecord(cores_sha256=fingerprint)  # full spectra: one value per bond dim
    return record, torch.cat([s.double() for s in factorized.spectra]).contiguous()


def _as_merged(
    factorized: FactorizedMatrix, original: torch.Tensor, fingerprint: str
) -> tuple[FactorizedMatrix, Fixup | None]:
    """A half-precision matrix's factorization with the errors of the weight merge writes
    (the cores' contraction rounded once to `original`'s dtype), and the rounding fixup that
    makes that weight bitwise `original`: for a lossless decompose (nothing cut) into wider
    cores, when at most `MAX_FIXUP_FRACTION` of the entries round wrong (the fixup holds at
    most that share); the error is then 0.0.

    `original` is the (out_dim, in_dim) matrix, `fingerprint` the cores'. Without a fixup,
    `rel_error` is the merged weight's error, and `predicted_error` (from the discarded singular
    values, blind to rounding) is raised to it."""
    half_cores = factorized.cores[0].dtype in HALF_DTYPES  # --dtype keep
    lossless = factorized.predicted_error == 0.0 and not half_cores
    limit = int(MAX_FIXUP_FRACTION * original.numel()) if lossless else -1
    index = rounding_fixup(factorized.matrix, original, limit)
    fixup = None
    if index is None:
        error = rounded_error(factorized.matrix, original)
    else:
        error = 0.0  # with the fixup, or without one when rounding alone is exact
        if index.numel():
            cols = original.shape[1]
            value = original[index // cols, index % cols].contiguous()
            fixup = Fixup(index, value, fingerprint)
    predicted = max(factorized.predicted_error, error)
    return replace(factorized, rel_error=error, predicted_error=predicted), fixup


def _prod(modes: tuple[int, ...]) -> int:
    p = 1
    for m in modes:
        p *= m
    return p


def _fmt(modes: tuple[int, ...]) -> str:
    return ",".join(map(str, modes))


def _plan(target: Target, shape: MPOShape, max_bond: int | None) -> PlannedModule:
    bonds = shape.full_bonds()
    if max_bond is not None:
        bonds = tuple(min(b, max_bond) for b in bonds)
    params = sum(
        bonds[k] * i * j * bonds[k + 1]
        for k, (i, j) in enumerate(zip(shape.out_modes, shape.in_modes, strict=True))
    )
    return PlannedModule(target=target, shape=shape, bonds=bonds, params=params)


def _decompose_one(
    planned: PlannedModule,
    weight: torch.Tensor,
    opts: DecomposeOptions,
    device: torch.device,
    writer: ShardedWriter,
) -> None:
    """Factorize one stored weight on `device`, add its cores to `writer`, fill
    `planned.record`."""
    target, shape = planned.target, planned.shape
    if not bool(torch.isfinite(weight).all()):
        bad = "NaN" if bool(torch.isnan(weight).any()) else "inf"
        raise ArtifactError(
            f"{target.weight_key} holds {bad} values and cannot be factorized; nothing was written",
            hint="the checkpoint is damaged or diverged in training: use another one, or leave "
            "the matrix out with --exclude-modules",
        )
    dtype = core_dtype(opts.dtype, weight.dtype)
    factorized = factorize_weight(
        weight.to(device), target.kind, shape, dtype=dtype, max_bond=opts.max_bond,
        rel_tol=opts.rel_tol,
    )  # fmt: skip
    if device.type != "cpu":
        factorized = replace(
            factorized,
            cores=on_cpu(factorized.cores),
            spectra=on_cpu(factorized.spectra),
            matrix=factorized.matrix.to("cpu"),
        )
    lossless = factorized.predicted_error == 0.0  # only then are spectra or a fixup kept
    fingerprint = cores_fingerprint(factorized.cores) if lossless else ""
    spectra = _recordable_spectra(factorized, fingerprint)
    fixup = None
    if weight.dtype in HALF_DTYPES:
        factorized, fixup = _as_merged(factorized, as_matrix(weight, target.kind), fingerprint)
    for k, core in enumerate(factorized.cores):
        writer.add(core_key(target.name, k), core)
    record = mpo_record(
        name=target.name,
        kind=target.kind,
        weight_shape=target.shape,
        dtype=weight.dtype,
        shape=shape,
        factorized=factorized,
        tied_keys=target.tied_keys,
    )
    if fixup is not None:
        fixed = FixupRecord(count=fixup.index.numel(), cores_sha256=fixup.cores_sha256)
        record = record.model_copy(update={"fixup": fixed})
        for key, tensor in zip(record.fixup_keys(), (fixup.index, fixup.value), strict=True):
            writer.add(key, tensor)
    if spectra is not None:
        record = record.model_copy(update={"spectra": spectra[0]})
        writer.add(*record.spectra_keys(), spectra[1])
    planned.record = record
    planned.bonds = tuple(planned.record.bonds)
    planned.params = planned.record.params
    release_free_memory()  # this matrix's temporaries
