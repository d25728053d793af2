"""merge: turn every transformed module back into a dense weight; write a plain Hugging Face
checkpoint.

The story: open and verify the artifact; stream its tensors into a new directory, replacing
the tensors each module record owns (the cores `M.mpo.core.k` of an MPO module) by the dense
weight its method computes, under the original name, shape, orientation (GPT-2 Conv1D is
transposed back) and dtype (an MPO module's rounding fixup, if decompose stored one for these
cores, then makes it bitwise the original); copy config and tokenizer. Hashing runs beside
the contractions, in threads (hashlib and torch let go of the GIL): the input's files are
checked against their checksums while the tensors stream (a damaged input still fails before
anything is published), each fixup's cores are fingerprinted while they are contracted, and
each output shard is hashed once written. Each tensor is read once. With
`verify`, run the factorized and the merged model on the same sample input before publishing:
if they differ, nothing is written and the stage fails with exit code 3. Both run in float32
(half-precision weights held exactly), the factorized one evaluating bitwise the weights a
correct merge writes, so that the tolerance of a half-precision merge can be derived from its
unit roundoff and sizes (`half_tolerance`) and a real fault cannot hide in rounding.

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
import math
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mposurgeon.artifact.config import read_config, set_artifact_mark
from mposurgeon.artifact.hub import PushOptions, check_can_push, push_folder
from mposurgeon.artifact.load import load_model
from mposurgeon.artifact.manifest import ModuleRecord
from mposurgeon.artifact.store import VOCABULARY_FILES, atomic_directory, copy_model_files
from mposurgeon.artifact.tensors import ShardedWriter, TensorReader, open_tensors
from mposurgeon.errors import ArtifactError, UsageError, VerificationError
from mposurgeon.memory import bound_heap_growth, release_free_memory
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import record_fixup
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.methods.mpoe.state import expert_weight
from mposurgeon.methods.registry import get_method
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.models.device import Device, compute_device
from mposurgeon.models.layers import HALF_DTYPES, MPOCores, MPOEmbedding, cores_fingerprint
from mposurgeon.models.layout import ModelLayout
from mposurgeon.models.moe_export import MoEExport, MoESpec, moe_export
from mposurgeon.models.orientation import as_matrix
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

#: merge --verify tolerance for float32 and float64 outputs: (atol, rtol) on the model's main
#: output. Half-precision outputs get a derived tolerance (`half_tolerance`).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-8, 1e-8),
}

#: Unit roundoff u (half the gap between 1 and the next number) of each dtype a merged
#: model is compared in or rounded to.
UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
}

#: How many times its estimate of what rounding alone can cause `half_tolerance` allows.
SAFETY = 8.0


class MergeOptions(StageOptions, PushOptions):
    """Options of `merge` (the CLI flags, one to one)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="auto: each weight's original dtype"
    )
    verify: bool = Field(False, description="compare factorized and merged outputs (exit 3)")
    base: str | None = Field(
        None, description="a PEFT adapter's base model (default: its adapter_config.json's)"
    )
    device: Device = Field(
        "auto", description="where each module is contracted: auto (a GPU when there is one)"
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
    bound_heap_growth()
    compute_device(opts.device)  # a device this machine lacks: refused before any work
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
        with (
            open_tensors(inp.path) as reader,
            ShardedWriter(tmp, opts.shard_size(inp.path)) as writer,
        ):
            merged = _write_dense(reader, records, writer, opts, progress, moe)
        if moe is not None:
            moe.config.save_pretrained(tmp)  # before the copy, which keeps it
        copy_model_files(inp.path, tmp)
        set_artifact_mark(tmp, marked=False)  # a plain checkpoint: from_pretrained loads it
        if opts.dtype != "auto":
            _record_dtype(tmp, opts.dtype)  # what from_pretrained loads the weights as
        if opts.verify:
            unrounded = sum(not isinstance(rec, MPORecord) for rec in records.values())
            comparison = verify_merge(inp.path, tmp, unrounded)
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
    return the number of modules merged. MPO and other modules are contracted on
    `opts.device` (MPOE experts on the CPU)."""
    device = compute_device(opts.device)
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
                tensors = dense_tensors(rec, reader, opts.dtype, device=device)
            for name, tensor in tensors.items():
                writer.add(name, _masked(name, tensor, masks, reader))
            del tensors
            release_free_memory()  # this module's temporaries
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
    rec: ModuleRecord,
    reader: Mapping[str, torch.Tensor],
    dtype: str = "auto",
    *,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the merged checkpoint one transformed module gives (its dense weight,
    IA3's scaled bias) by name, as the original checkpoint stored them, in `dtype`. An MPO
    module's rounding fixup is applied when merging to its recorded dtype and made for its
    cores as they are (a stage that wrote other cores may have left it: then it is stale).

    Each of the module's tensors is read once (`_Held`), and the cores' fingerprint, which
    tells whether the fixup is theirs, is hashed in a background thread while the main one
    contracts them (hashlib lets go of the GIL). With a `device` other than the CPU, the
    method reads the module's tensors there and its results come back to the CPU."""
    to = _dtype_of(rec, dtype)
    held = _Held(reader)
    fixup = None
    if isinstance(rec, MPORecord) and to == FLOAT_DTYPES[rec.dtype]:
        fixup = record_fixup(rec, held)
    on_device = held if device is None or device.type == "cpu" else _Moved(held, device)
    with ThreadPoolExecutor(1, thread_name_prefix="mposurgeon-fingerprint") as pool:
        fingerprint = None
        if isinstance(rec, MPORecord) and fixup is not None:  # the cores as stored
            fingerprint = pool.submit(cores_fingerprint, [held[k] for k in rec.core_keys()])
        tensors = get_method(rec.method).dense_tensors(rec, on_device)
        out = {name: t.to(to).to("cpu").contiguous() for name, t in tensors.items()}
        # `Fixup.matches`, its fingerprint hashed meanwhile
        if (
            fixup is not None
            and fingerprint is not None
            and fingerprint.result() == fixup.cores_sha256
        ):
            fixup.apply(as_matrix(out[rec.weight_key], rec.kind))  # bitwise the original
    return out


class _Held(Mapping[str, torch.Tensor]):
    """A read-only view of `tensors` (a reader or a dict) that reads each tensor once and
    hands out the same tensor again: a module's tensors, read by the method and by merge."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._read: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._read:
            self._read[key] = self._tensors[key]
        return self._read[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class _Moved(_Held):
    """`tensors` as read on `device`: each read once, moved there once, and handed out again."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
        super().__init__(tensors)
        self._device = device
        self._moved: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._moved:
            self._moved[key] = super().__getitem__(key).to(self._device)
        return self._moved[key]


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


def verify_merge(artifact: Path, merged: Path, unrounded: int = 0) -> OutputComparison:
    """Run the factorized artifact and the merged checkpoint on the same input; raise if they
    differ beyond the tolerance of the merged dtype.

    The factorized model evaluates exactly the weights a correct merge writes
    (`evaluate_as_merged`: MPO layers rebuild their matrices rounded once to the merged dtype),
    so for MPO modules rounding alone leaves no difference; `unrounded` counts the modules
    whose merged weights it cannot round alike (other methods' adapters, experts), each
    allowed its rounding in the tolerance (`half_tolerance`)."""
    from transformers import AutoConfig

    dense, dtype = _merged_model(merged)
    # merge checks the checksums itself
    factorized = load_model(artifact, verify=False, forward_mode="reconstruct")
    evaluate_as_merged(factorized, dtype)
    batch = sample_batch(AutoConfig.from_pretrained(merged), verify_tokenizer(merged))
    reference = model_output(factorized, batch)
    return _compare(reference, dense, dtype, batch, unrounded, "the factorized model's")


def check_merged(
    reference: torch.Tensor,
    merged: Path,
    batch: dict[str, torch.Tensor],
    of: str = "the factorized model's",
    unrounded: int | None = None,
) -> OutputComparison:
    """Compare the merged checkpoint's output on `batch` with `reference`, the unmerged
    model's (`model_output`, computed in float32 or finer; `of` names it in the error); raise
    if they differ beyond the tolerance of the merged dtype. `unrounded`: how many matrices
    the reference holds unrounded that the merged checkpoint holds rounded to a half-precision
    dtype (None: possibly all of them)."""
    dense, dtype = _merged_model(merged)
    return _compare(reference, dense, dtype, batch, unrounded, of)


def half_tolerance(
    dtype: torch.dtype, scale: float, *, unrounded: int, products: int, width: int
) -> float:
    """The largest |difference| of main outputs `merge --verify` accepts for a checkpoint
    merged to half-precision `dtype`, both models evaluated in float32 on the same weights
    but for `unrounded` matrices; `scale`: the largest |output| of the reference.

    Rounding alone leaves two differences, relative to `scale`: each of the `unrounded`
    matrices is rounded to `dtype` in the merged checkpoint only (relative error <= u per
    entry, u the unit roundoff of `dtype`), independent errors that add up as
    u * sqrt(unrounded); and float32 evaluation in another order (a dense layer against
    the factorized one) rounds each of the `products` matrix products, of inner dimension
    <= `width`, by about u32 * sqrt(width) (probabilistic bound), u32 * sqrt(width * products)
    in all. The tolerance is SAFETY times their sum. With only MPO modules (`unrounded` 0),
    rounding takes none of it (the factorized model evaluates bitwise the weights merge
    writes), and it is 2.3e-4 of the output's scale for BERT-base shapes, 4.5e-4 for a 1B
    Llama's; one matrix off by 1% of its norm moved the output by 0.1-1.7% of its scale
    (bf16 and fp16 Llama and BERT, hidden 32 to 1024), 12-170 times the tolerance."""
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    estimate = u * math.sqrt(unrounded) + u32 * math.sqrt(width * products)
    return SAFETY * scale * estimate


def evaluate_as_merged(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `model` (a factorized model from `load_model`) evaluate the weights a merge to
    `dtype` writes, in float32 (in float64 for float64): each MPO layer rebuilds its matrix
    rounded once to `dtype` (`MPOCores.round_to`), every other parameter is rounded to
    `dtype`, and half-precision tensors are held in float32 (exactly). In place."""
    work = _work_dtype(dtype)
    mpos = [m for m in model.modules() if isinstance(m, MPOCores)]
    cores = {id(p) for m in mpos for p in m.parameters()}
    for mpo in mpos:
        mpo.round_to = dtype
    for embedding in model.modules():
        if isinstance(embedding, MPOEmbedding):
            embedding.dtype = work  # rows in the dtype the model is compared in
    for param in model.parameters():
        if param.is_floating_point():
            rounded = param.data if id(param) in cores else param.data.to(dtype)
            param.data = rounded.to(_work_dtype(rounded.dtype))
    _hold_half_in_float32(model)
    if work == torch.float64:
        model.double()
    return model


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model merged to `dtype` is compared in: float32 for half precision."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _hold_half_in_float32(model: nn.Module) -> None:
    """Convert `model`'s half-precision parameters and buffers to float32 (exact), in place."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype in HALF_DTYPES:
            tensor.data = tensor.data.float()


def _merged_model(merged: Path) -> tuple[nn.Module, torch.dtype]:
    """The merged checkpoint as `from_pretrained` loads it, held in its comparison dtype
    (`_work_dtype`), and the dtype it was loaded in."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(merged)
    with quiet_transformers():
        dense = model_class(config).from_pretrained(merged).eval()
    dtype = next(dense.parameters()).dtype
    _hold_half_in_float32(dense)
    return dense, dtype


def _products(model: nn.Module) -> tuple[int, int]:
    """The number of matrix products (linear layers) of a dense model, and their largest
    inner dimension."""
    from transformers.pytorch_utils import Conv1D

    dims = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    dims += [int(m.weight.shape[0]) for m in model.modules() if isinstance(m, Conv1D)]
    return len(dims), max(dims, default=1)


def _compare(
    reference: torch.Tensor,
    dense: nn.Module,
    dtype: torch.dtype,
    batch: dict[str, torch.Tensor],
    unrounded: int | None,
    of: str,
) -> OutputComparison:
    """Compare `dense`'s output on `batch` with `reference`; raise if they differ beyond the
    tolerance of `dtype`, the dtype `dense` was merged to."""
    other = model_output(dense, batch)
    if dtype in HALF_DTYPES:
        products, width = _products(dense)
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        tolerance = half_tolerance(
            dtype,
            scale,
            unrounded=products if unrounded is None else unrounded,
            products=products,
            width=width,
        )
        atol, rtol = 0.0, tolerance / scale if scale > 0 else 0.0
    else:
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
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None
