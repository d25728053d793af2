"""merge: turn every transformed module back into a dense weight; write a plain Hugging Face
checkpoint.

The story: open and verify the artifact; stream its tensors into a new directory, replacing
the tensors each module record owns (the cores `M.mpo.core.k` of an MPO module) by the dense
weight its method computes, under the original name, shape, orientation (GPT-2 Conv1D is
transposed back) and dtype; copy config and tokenizer. With
`verify`, run the factorized and the merged model on the same sample input before publishing:
if they differ, nothing is written and the stage fails with exit code 3.

An MPO mixture of experts (`moe`) has no dense form: its model is written as the
`transformers` MoE class of its architecture (`models/moe_export.py`: Llama-family models
become Mixtral, T5 Switch Transformers), each expert's dense weights and each router renamed
to that class's tensors, and its config replaced by the class's; other architectures are
refused (they run through `load_model`).

A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) is merged into its
base model (`--base`, else the one its config records): `stages/peft_adapter.py`.

With `push_to_hub`, the written checkpoint is uploaded last (`artifact/hub.py`); a failed push
leaves it in place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoConfig, AutoTokenizer

from mposurgeon.artifact.config import read_config, set_artifact_mark
from mposurgeon.artifact.hub import PushOptions, check_can_push, push_folder
from mposurgeon.artifact.load import load_model
from mposurgeon.artifact.manifest import ModuleRecord
from mposurgeon.artifact.store import VOCABULARY_FILES, atomic_directory, copy_model_files
from mposurgeon.artifact.tensors import ShardedWriter, TensorReader, open_tensors
from mposurgeon.errors import ArtifactError, UsageError, VerificationError
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.methods.mpoe.state import expert_weight
from mposurgeon.methods.registry import get_method
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.models.layout import ModelLayout
from mposurgeon.models.moe_export import MoEExport, MoESpec, moe_export
from mposurgeon.models.probe import OutputComparison, compare_outputs, model_output, sample_batch
from mposurgeon.models.pruning import masked_key
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    FLOAT_DTYPES,
    StageOptions,
    check_mpo_records,
    finish_artifact,
    model_layout,
    open_input,
    plan_output,
    tensor_shapes,
    verified_input,
)

#: merge tolerance per output dtype: (atol, rtol) on the model's main output.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-8, 1e-8),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 2e-2),
}


class MergeOptions(StageOptions, PushOptions):
    """Options of `merge` (the CLI flags, one to one)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="auto: each weight's original dtype"
    )
    verify: bool = Field(False, description="compare factorized and merged outputs (exit 3)")
    base: str | None = Field(
        None, description="a PEFT adapter's base model (default: its adapter_config.json's)"
    )


@dataclass
class MergeResult:
    output: Path
    merged_modules: int
    comparison: OutputComparison | None = None
    peft_type: str | None = None  # a PEFT adapter's (LORA, IA3), merged into `base`
    base: str | None = None
    architecture: str | None = None  # the MoE class a mixture of experts was written as
    commit_url: str | None = None  # the Hub commit of `push_to_hub`


def merge(
    artifact: str | Path,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> MergeResult:
    """Write a dense checkpoint equal to the artifact's factorized model (or to a PEFT
    adapter on its base model); with `push_to_hub`, upload it (`commit_url`)."""
    opts = options or MergeOptions(**kwargs)
    if opts.push_to_hub is not None:
        check_can_push(opts.push_to_hub)
    result = _merge(artifact, opts, progress)
    if opts.push_to_hub is not None:
        result.commit_url = push_folder(
            result.output, opts.push_to_hub, private=opts.private, stage="merge"
        )
    return result


def _merge(
    artifact: str | Path, opts: MergeOptions, progress: ProgressCallback | None
) -> MergeResult:
    from mposurgeon.stages import peft_adapter  # which imports this module

    if peft_adapter.is_adapter_dir(artifact):
        return peft_adapter.merge_adapter(artifact, opts, progress)
    if opts.base is not None:
        raise UsageError(
            f"--base applies to a PEFT adapter directory, and {artifact} is none "
            f"(no {peft_adapter.ADAPTER_CONFIG})",
            hint="leave --base out",
        )
    inp = open_input(artifact, opts, defer_checksums=True)
    if inp.manifest is None:
        raise UsageError(
            f"{inp.path} is not a mposurgeon artifact (no mposurgeon.json)",
            hint="merge reads the output of decompose, truncate or train",
        )
    records = inp.modules
    # Before any work: the config must match the tensors, and each module its kind in the
    # model (merge orients the weight by it) and a float dtype to write.
    shapes = tensor_shapes(inp)
    layout = model_layout(inp.path, shapes)
    check_mpo_records(layout, records, shapes)
    moe = _moe_export(inp.path, layout, shapes, records)  # experts: an MoE checkpoint
    for rec in records.values():
        method = get_method(rec.method)
        if not method.has_dense_form and not isinstance(rec, MPOERecord):
            raise method.no_dense_form(rec)
        _dtype_of(rec, opts.dtype)
    out = plan_output(inp, opts, "merge")
    comparison = None
    with atomic_directory(out, overwrite=opts.overwrite) as tmp, verified_input(inp):
        with open_tensors(inp.path) as reader, ShardedWriter(tmp, opts.max_shard_size) as writer:
            merged = _write_dense(reader, records, writer, opts, progress, moe)
        if moe is not None:
            moe.config.save_pretrained(tmp)  # before the copy, which keeps it
        copy_model_files(inp.path, tmp)
        set_artifact_mark(tmp, marked=False)  # a plain checkpoint: from_pretrained loads it
        if opts.dtype != "auto":
            _record_dtype(tmp, opts.dtype)  # what from_pretrained loads the weights as
        if opts.verify:
            comparison = verify_merge(inp.path, tmp)
        metrics = {"verify": asdict(comparison) | {"ok": comparison.ok}} if comparison else None
        finish_artifact(
            tmp,
            inp=inp,
            stage="merge",
            options=opts,
            modules={},
            known_checksums=writer.checksums(),
            metrics=metrics,
        )
    architecture = moe.architecture if moe is not None else None
    return MergeResult(
        output=out, merged_modules=merged, comparison=comparison, architecture=architecture
    )


def _moe_export(
    path: Path,
    layout: ModelLayout,
    shapes: dict[str, tuple[int, ...]],
    records: dict[str, ModuleRecord],
) -> MoEExport | None:
    """The MoE checkpoint the artifact's mixture of experts becomes; None without one.
    Refuses an architecture with no MoE class in transformers, and a mixture that class
    cannot compute, before any work."""
    experts = {n: r for n, r in records.items() if isinstance(r, MPOERecord)}
    if not experts:
        return None
    specs = {n: MoESpec(r.experts, r.top_k, r.gate) for n, r in experts.items()}
    file_keys = set(shapes) | {rec.weight_key for rec in records.values()}
    export = moe_export(layout, file_keys, read_config(path), specs)
    if export is None:
        rec = next(iter(experts.values()))
        raise get_method(rec.method).no_dense_form(rec)
    return export


def _write_dense(
    reader: TensorReader,
    records: dict[str, ModuleRecord],
    writer: ShardedWriter,
    opts: MergeOptions,
    progress: ProgressCallback | None,
    moe: MoEExport | None = None,
) -> int:
    """Stream every tensor to `writer`, writing each module's dense weight (a mixture of
    experts': its experts' and router's, as `moe` names them) where its first tensor was;
    return the number of modules merged."""
    keys = reader.keys()
    owner = {key: rec for rec in records.values() for key in rec.tensor_shapes()}
    # pruning masks (`prune`): every tensor written is zero where its mask says, and the
    # masks stay out of the plain checkpoint
    masks = {base: key for key in keys if (base := masked_key(key)) is not None}
    mask_keys = set(masks.values())
    merged = 0
    for i, key in enumerate(keys):
        rec = owner.get(key)
        if key in mask_keys:
            pass
        elif rec is None:
            tensor = reader.get(key)
            if opts.dtype != "auto" and tensor.is_floating_point():
                tensor = tensor.to(getattr(torch, opts.dtype))
            writer.add(key, _masked(key, tensor, masks, reader))
        elif key == next(iter(rec.tensor_shapes())):
            if isinstance(rec, MPOERecord) and moe is not None:
                tensors = expert_tensors(rec, reader, moe, opts.dtype)
            else:
                tensors = dense_tensors(rec, reader, opts.dtype)
            for name, tensor in tensors.items():
                writer.add(name, _masked(name, tensor, masks, reader))
            merged += 1
        if progress:
            progress("merge", i + 1, len(keys))
    if merged != len(records):  # a module without tensors: the manifest lists what is not there
        raise ArtifactError(
            f"{len(records) - merged} modules listed in mposurgeon.json have no tensors in "
            "the tensor files; nothing was written",
            hint="re-create the artifact with the stage that made it, or restore it",
        )
    return merged


def _masked(
    key: str, tensor: torch.Tensor, masks: dict[str, str], reader: TensorReader
) -> torch.Tensor:
    """`tensor` (stored as `key`) with the entries its pruning mask marks set to exact zeros."""
    if key not in masks:
        return tensor
    return tensor.masked_fill(reader.get(masks[key]).bool(), 0)


def dense_weight(rec: ModuleRecord, reader: TensorReader, dtype: str = "auto") -> torch.Tensor:
    """The dense weight of one transformed module as the original checkpoint stored it, in
    `dtype` ("auto": its recorded dtype)."""
    weight = get_method(rec.method).to_dense(rec, reader)
    return weight.to(_dtype_of(rec, dtype)).contiguous()


def dense_tensors(
    rec: ModuleRecord, reader: TensorReader, dtype: str = "auto"
) -> dict[str, torch.Tensor]:
    """Every tensor of the merged checkpoint one transformed module gives (its dense weight,
    IA3's scaled bias) by name, as the original checkpoint stored them, in `dtype`."""
    to = _dtype_of(rec, dtype)
    tensors = get_method(rec.method).dense_tensors(rec, reader)
    return {name: t.to(to).contiguous() for name, t in tensors.items()}


def expert_tensors(
    rec: MPOERecord, reader: TensorReader, moe: MoEExport, dtype: str = "auto"
) -> dict[str, torch.Tensor]:
    """The tensors of the MoE checkpoint one MPOE matrix gives, by name: each expert's dense
    weight, and the block's router weight (E, d_model) if the record owns it, in `dtype`."""
    to = _dtype_of(rec, dtype)
    out = {
        moe.expert_key(rec.name, e): expert_weight(rec, reader, e).to(to).contiguous()
        for e in range(rec.experts)
    }
    if rec.owns_router:
        out[moe.router_key(rec.router)] = reader.get(f"{rec.router}.weight").to(to)
    return out


def _dtype_of(rec: ModuleRecord, dtype: str = "auto") -> torch.dtype:
    """The dtype module `rec` is merged to: `dtype`, or for "auto" its recorded float dtype."""
    name = rec.dtype if dtype == "auto" else dtype
    if name not in FLOAT_DTYPES:
        raise ArtifactError(
            f"mposurgeon.json has an invalid field modules.{rec.name}.dtype: {name!r} is not "
            f"one of {', '.join(FLOAT_DTYPES)}",
            hint="re-create the artifact with the stage that made it, or pass merge --dtype",
        )
    return FLOAT_DTYPES[name]


def _record_dtype(directory: Path, dtype: str) -> None:
    """Say in `directory`'s config.json that its weights are `dtype` (written by --dtype)."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    if "torch_dtype" in config:  # written by older transformers
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_merge(artifact: Path, merged: Path) -> OutputComparison:
    """Run the factorized artifact and the merged checkpoint on the same input; raise if they
    differ beyond the tolerance of the merged dtype."""
    factorized = load_model(artifact, verify=False)  # merge checks the checksums itself
    batch = sample_batch(AutoConfig.from_pretrained(merged), verify_tokenizer(merged))
    return check_merged(model_output(factorized, batch), merged, batch)


def check_merged(
    reference: torch.Tensor,
    merged: Path,
    batch: dict[str, torch.Tensor],
    of: str = "the factorized model's",
) -> OutputComparison:
    """Compare the merged checkpoint's output on `batch` with `reference`, the unmerged
    model's (`model_output`; `of` names it in the error); raise if they differ beyond the
    tolerance of the merged dtype."""
    config = AutoConfig.from_pretrained(merged)
    with quiet_transformers():
        dense = model_class(config).from_pretrained(merged).eval()
    other = model_output(dense, batch)
    dtype = next(dense.parameters()).dtype
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    result = compare_outputs(reference, other, atol, rtol)
    if not result.ok:
        raise VerificationError(
            f"merged outputs differ from {of}: max |diff| "
            f"{result.max_abs_diff:.3g} > tolerance {result.tolerance:.3g}; nothing was written",
            hint="re-run with --debug, and report it if the artifact is unmodified",
        )
    return result


def verify_tokenizer(directory: Path) -> object | None:
    """The checkpoint's tokenizer if it ships one, else None (random ids are used)."""
    if not any((directory / n).exists() for n in VOCABULARY_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None
