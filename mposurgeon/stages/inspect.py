"""inspect: describe a checkpoint, artifact or safetensors file without loading its weights.

The report is plain JSON-able data (the `inspect --json` schema of DESIGN.md): `kind`,
`format_version`, `stage`, `lineage`, `params`, `modules`, and `selection` / `metrics` when a
stage recorded them. Shapes come from safetensors headers; nothing is computed from weights,
except for `plot` on an artifact that was not trained, which reads the MPO cores to draw their
bond spectra (a trained artifact's `plot` draws its training curves, from the manifest).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mposurgeon.artifact.manifest import Manifest, load_artifact
from mposurgeon.artifact.resolve import resolve_model
from mposurgeon.artifact.tensors import TensorReader, open_tensors
from mposurgeon.errors import UsageError
from mposurgeon.methods.mpo.record import (
    FIXUP_KEY,
    SPECTRA_KEY,
    FactorizedRecord,
    MPORecord,
)
from mposurgeon.methods.mpo.state import record_cores
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.models.pruning import masked_key
from mposurgeon.mpo.contract import contract_flops, reconstruct_flops
from mposurgeon.mpo.decomposition import bond_spectra
from mposurgeon.plot import (
    ModuleSpectra,
    plot_curves,
    plot_spectra,
    require_matplotlib,
    training_curves,
)

#: The stage whose artifacts `plot` draws as training curves (every other one: bond spectra).
CURVES_STAGE = "train"


def inspect(
    path: str | Path,
    *,
    verify: bool = True,
    revision: str | None = None,
    offline: bool | None = None,
    cache_dir: Path | None = None,
    plot: str | Path | None = None,
) -> dict[str, Any]:
    """The report of an artifact, a Hugging Face model directory or a `.safetensors` file.

    plot: also draw a figure into this PNG (needs matplotlib); the report then has `plot`: its
    path. A trained artifact (stage `train`) gets its training curves (loss and eval metrics
    per step, from the manifest); any other gets every MPO module's bond spectra (this reads
    the cores, the only case where inspect reads weights).
    """
    if plot is not None:
        require_matplotlib()  # fail before any work
    resolved = resolve_model(
        str(path), revision=revision, offline=offline, cache_dir=cache_dir, allow_file=True
    )
    manifest = load_artifact(resolved.path, verify=verify) if resolved.kind == "artifact" else None
    with open_tensors(resolved.path) as reader:
        report = _report(reader, manifest)
        if plot is not None and manifest is not None and manifest.stage == CURVES_STAGE:
            metrics = manifest.metrics or {}
            title = ", ".join(
                [resolved.name]
                + [f"{k} {metrics[k]}" for k in ("method", "task") if metrics.get(k) is not None]
            )
            report["plot"] = str(plot_curves(training_curves(metrics), plot, title=title))
        elif plot is not None:
            if manifest is None or not manifest.modules:
                raise UsageError(
                    f"--plot draws MPO bond spectra (or a trained artifact's training curves), "
                    f"and {resolved.path} has no MPO modules",
                    hint="run `mposurgeon decompose` first and plot its output",
                )
            spectra = module_spectra(reader, manifest)
            report["plot"] = str(plot_spectra(spectra, plot, title=f"{resolved.name}"))
    report.update(kind=resolved.kind, path=str(resolved.path), name=resolved.name)
    if resolved.model_id:
        report["model_id"] = resolved.model_id
    return report


def plot_kind(stage: str | None) -> str:
    """What `inspect(..., plot=...)` draws for an artifact of `stage` (None: not an artifact)."""
    return "training curves" if stage == CURVES_STAGE else "bond spectra"


def _report(reader: TensorReader, manifest: Manifest | None) -> dict[str, Any]:
    records = dict(manifest.modules) if manifest else {}
    factorized = [rec for rec in records.values() if isinstance(rec, FactorizedRecord)]
    modules = [_mpo_row(rec) for rec in factorized]
    mpo_keys = {key for rec in factorized for key in rec.tensor_shapes()}
    # other methods' own tensors (LoRA factors, APET positions) are no dense matrices
    extra = {
        key
        for rec in records.values()
        if not isinstance(rec, FactorizedRecord)
        for key in rec.tensor_shapes()
        if key != rec.weight_key
    }
    masks = {key for key in reader.keys() if masked_key(key) is not None}
    pruning = getattr(manifest, "pruning", None) if manifest else None
    pruned_before = manifest is not None and any(e.stage == "prune" for e in manifest.lineage)
    # a pruned artifact, or one made from one (a merge): report every matrix's sparsity
    sparse = bool(masks) or pruning is not None or pruned_before
    for key in reader.keys():
        if key in masks or key in mpo_keys or key in extra:
            continue  # a pruning mask (no parameter), MPO cores, another method's tensors
        if key.endswith(".weight") and len(reader.shape(key)) == 2:
            modules.append(_dense_row(key, reader, sparsity=sparse))
    report: dict[str, Any] = {
        "format_version": manifest.format_version if manifest else None,
        "stage": manifest.stage if manifest else None,
        "lineage": [e.model_dump(mode="json") for e in manifest.lineage] if manifest else [],
        "base": manifest.base.model_dump(mode="json") if manifest else None,
        "params": _params(reader, manifest),
        "modules": modules,
    }
    if manifest is not None:
        mpo_records = [r for r in records.values() if isinstance(r, MPORecord)]
        if mpo_records:
            report["params"]["multiply_adds"] = _multiply_adds(mpo_records)
        if manifest.metrics:
            report["metrics"] = manifest.metrics
        selection = manifest.selection.model_dump(mode="json") if manifest.selection else None
        if selection:  # as recorded (an empty record is left out)
            report["selection"] = selection
    if sparse:
        report["pruning"] = pruning if pruning is not None else {"masks": len(masks)}
    experts = [r for r in records.values() if isinstance(r, MPOERecord)]
    if experts:
        report["experts"] = _experts(experts, (manifest.metrics or {}) if manifest else {})
    return report


def count_params(
    model: str | Path,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The parameter counts of `inspect`'s report (`params`, without `multiply_adds`) of a
    model directory, artifact, `.safetensors` file or hub id, from the tensor headers and the
    manifest alone (no checksum, no weight read): `total` (every tensor but pruning masks),
    `mpo` (MPO cores), `dense`, `trainable`; an artifact's `dense_equivalent_of_mpo`,
    `mpo_ratio`, and a trained one's `trainable_head`."""
    resolved = resolve_model(
        str(model), revision=revision, offline=offline, cache_dir=cache_dir, allow_file=True
    )
    manifest = load_artifact(resolved.path, verify=False) if resolved.kind == "artifact" else None
    with open_tensors(resolved.path) as reader:
        return _params(reader, manifest)


def _params(reader: TensorReader, manifest: Manifest | None) -> dict[str, Any]:
    """The report's `params` (without `multiply_adds`): counts of the tensor headers."""
    records = dict(manifest.modules) if manifest else {}
    mpo_keys = {
        key
        for rec in records.values()
        if isinstance(rec, FactorizedRecord)
        for key in rec.tensor_shapes()
    }
    total = mpo = 0
    for key in reader.keys():
        if masked_key(key) is not None or FIXUP_KEY.fullmatch(key) or SPECTRA_KEY.fullmatch(key):
            continue  # a pruning mask, a rounding fixup or recorded spectra, no parameter
        n = math.prod(reader.shape(key))
        total += n
        if key in mpo_keys:
            mpo += n
    params: dict[str, Any] = {"total": total, "mpo": mpo, "dense": total - mpo, "trainable": None}
    if manifest is not None:
        dense_equiv = sum(r.dense_params for r in records.values())
        params["dense_equivalent_of_mpo"] = dense_equiv
        params["mpo_ratio"] = mpo / dense_equiv if dense_equiv else None
        if manifest.metrics:
            params["trainable"] = manifest.metrics.get("trainable_params")
            params["trainable_head"] = manifest.metrics.get("trainable_head")
    return params


def _multiply_adds(records: list[MPORecord]) -> dict[str, int]:
    """Multiply-adds of the MPO modules (Linear and Conv1D): per input row contracted through
    the cores, once to rebuild every dense weight, and per row of the dense product."""
    contract = rebuild = dense = 0
    for rec in records:
        if rec.kind == "embedding":
            continue
        cores = [torch.empty(shape, device="meta") for shape in rec.core_shapes()]
        contract += contract_flops(cores, 1)
        rebuild += reconstruct_flops(cores)
        dense += rec.out_dim * rec.in_dim
    return {"contract_per_row": contract, "reconstruct": rebuild, "dense_per_row": dense}


def _experts(records: list[MPOERecord], metrics: dict[str, Any]) -> dict[str, Any]:
    """The mixtures of experts: counts, parameters (`shared`: central cores, once;
    `per_expert`: one expert's auxiliary cores; `dense_experts`: E dense copies of the same
    matrices plus the routers, as Switch-style upcycling would hold) and the training load."""
    first = records[0]
    shared = per_expert = routers = dense = 0
    for rec in records:
        shapes = rec.tensor_shapes()
        central = math.prod(shapes.pop(rec.central_key()))
        if rec.owns_router:
            routers += math.prod(shapes.pop(f"{rec.router}.weight"))
        shared += central
        per_expert += sum(math.prod(s) for s in shapes.values()) // rec.experts
        dense += rec.dense_params
    mpoe = shared + first.experts * per_expert + routers
    return {
        "experts": first.experts,
        "top_k": first.top_k,
        "gate": first.gate,
        "blocks": sum(r.owns_router for r in records),
        "matrices": len(records),
        "params": {
            "shared": shared,
            "per_expert": per_expert,
            "routers": routers,
            "mpoe": mpoe,
            "dense_experts": first.experts * dense + routers,
        },
        "load": metrics.get("expert_load"),
    }


def _mpo_row(rec: FactorizedRecord) -> dict[str, Any]:
    row = {
        "name": rec.name,
        "kind": "mpo",
        "layer": rec.kind,
        "shape": [rec.out_dim, rec.in_dim],
        "dtype": rec.dtype,
        "modes": [rec.out_modes, rec.in_modes],
        "padding": [rec.out_padding, rec.in_padding],
        "bonds": rec.bonds,
        "central_index": rec.central_index,
        "trainable": rec.trainable if isinstance(rec, MPORecord) else None,
        "params": rec.params,
        "dense_params": rec.dense_params,
        "overparam_factor": rec.params / rec.dense_params,
        "rel_error": rec.rel_error,
        "predicted_error": rec.predicted_error,
        "entropy": rec.entropy,
        "tied_keys": rec.tied_keys,
    }
    if isinstance(rec, MPOERecord):
        row["experts"] = rec.experts
        row["role"] = rec.role
    return row


def _dense_row(key: str, reader: TensorReader, *, sparsity: bool = False) -> dict[str, Any]:
    """A dense matrix; with `sparsity`, also its fraction of exact zeros (reads it)."""
    shape = list(reader.shape(key))
    row: dict[str, Any] = {
        "name": key.removesuffix(".weight"),
        "kind": "dense",
        "shape": shape,
        "dtype": str(reader.dtype(key)).removeprefix("torch."),
        "modes": None,
        "bonds": None,
        "params": math.prod(shape),
        "rel_error": None,
    }
    if sparsity:
        weight = reader.get(key)
        row["zeros"] = int((weight == 0).sum())
        row["sparsity"] = row["zeros"] / max(weight.numel(), 1)
    return row


def module_spectra(reader: TensorReader, manifest: Manifest) -> list[ModuleSpectra]:
    """Canonical bond spectra (divided by ||W||_F) of every MPO module, read from its cores."""
    result = []
    for rec in manifest.modules.values():
        if not isinstance(rec, MPORecord):
            continue
        cores = record_cores(rec, reader)
        spectra = bond_spectra(cores)
        norm = float(spectra[0].square().sum().sqrt()) if spectra else 0.0
        shape = rec.mpo_shape
        result.append(
            ModuleSpectra(
                name=rec.name,
                spectra=[(s / norm if norm > 0 else s).tolist() for s in spectra],
                full_bonds=list(shape.full_bonds()[1:-1]),
            )
        )
    return result
