"""What every stage shares: input/output options, opening the input, writing the artifact.

A stage reads a checkpoint or artifact and writes a new artifact directory atomically; it never
modifies its input. Nothing here knows about the terminal: progress goes through a callback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mposurgeon._version import __version__
from mposurgeon.artifact.cache import read_record, record_key, write_record
from mposurgeon.artifact.config import set_artifact_mark, unmarked_config
from mposurgeon.artifact.manifest import (
    MANIFEST_NAME,
    BackgroundChecksums,
    BaseInfo,
    Manifest,
    ModuleRecord,
    SelectionRecord,
    check_file_list,
    load_artifact,
    new_manifest,
    write_manifest,
)
from mposurgeon.artifact.resolve import ResolvedModel, resolve_model
from mposurgeon.artifact.store import (
    atomic_directory,
    check_output_dir,
    claim_version_dir,
    copy_model_files,
    release_claim,
)
from mposurgeon.artifact.tensors import ShardedWriter, auto_shard_size, open_tensors, parse_size
from mposurgeon.errors import ArtifactError, UsageError
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.models.layout import (
    LAYOUT_FORMAT,
    ModelLayout,
    check_layout_files,
    file_key_mapper,
)
from mposurgeon.stages.card import write_model_card
from mposurgeon.training.params import unique_state_dict

if TYPE_CHECKING:
    from mposurgeon.methods.base import Method


def default_workdir() -> Path:
    """Where versioned outputs go without `-o`: $MPOSURGEON_WORKDIR or ./mposurgeon-out."""
    return Path(os.environ.get("MPOSURGEON_WORKDIR", "mposurgeon-out"))


class InputOptions(BaseModel):
    """Options of every stage's input: where a hub id resolves from, whether an artifact's
    checksums are checked. A stage that writes nothing (`eval`) takes only these."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = None
    offline: bool | None = None
    cache_dir: Path | None = None
    verify_checksums: bool = Field(True, description="check the input artifact's checksums")


class StageOptions(InputOptions):
    """Options every stage that writes an artifact takes: its input's, and where the output
    goes."""

    output: Path | None = Field(None, description="output directory (default: versioned)")
    workdir: Path = Field(default_factory=default_workdir)
    overwrite: bool = False
    max_shard_size: int | Literal["auto"] = Field(
        "auto",
        description="bytes per safetensors shard; auto: the input's largest, at most 500 MB",
    )

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> int | Literal["auto"]:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return parse_size(value)
        except UsageError as err:
            raise UsageError(
                f"--max-shard-size: {err}",
                hint='write a size like "500MB" or "2GiB", or auto to follow the input\'s shards',
            ) from None

    def shard_size(self, source: Path) -> int:
        """Bytes per output shard for a stage reading `source`: `max_shard_size`, or for
        `auto` the input's sharding (`auto_shard_size`)."""
        if self.max_shard_size == "auto":
            return auto_shard_size(source)
        return self.max_shard_size


@dataclass
class StageInput:
    """A resolved input: an HF checkpoint directory or an artifact with its manifest."""

    resolved: ResolvedModel
    manifest: Manifest | None
    checksum_check: BackgroundChecksums | None = None  # a deferred check of the input's files

    @property
    def path(self) -> Path:
        return self.resolved.path

    @property
    def base(self) -> BaseInfo:
        """The original checkpoint this input descends from."""
        if self.manifest is not None:
            return self.manifest.base
        r = self.resolved
        return BaseInfo(name=r.name, model_id=r.model_id, revision=r.revision, path=str(r.path))

    @property
    def selection(self) -> SelectionRecord | None:
        """The `select` stage's choice recorded in the input's lineage, if any."""
        return self.manifest.selection if self.manifest is not None else None

    @property
    def modules(self) -> dict[str, ModuleRecord]:
        """The input's module records, whatever method owns them."""
        return dict(self.manifest.modules) if self.manifest is not None else {}

    @property
    def mpo_modules(self) -> dict[str, MPORecord]:
        """The input's modules held as MPO cores."""
        return {n: r for n, r in self.modules.items() if isinstance(r, MPORecord)}

    def wait_verified(self) -> None:
        """Return once the input's deferred checksum check has passed; raise if it failed."""
        if self.checksum_check is not None:
            self.checksum_check.wait()


def open_input(
    model: str | Path, options: InputOptions, *, defer_checksums: bool = False
) -> StageInput:
    """Resolve `model` and, for an artifact, read and verify its manifest.

    With `defer_checksums`, only the file list is checked now; hashing the files waits for
    `verified_input` (which runs it alongside the stage's work) or `finish_artifact`.
    """
    resolved = resolve_model(
        str(model), revision=options.revision, offline=options.offline, cache_dir=options.cache_dir
    )
    if resolved.kind != "artifact":
        return StageInput(resolved=resolved, manifest=None)
    if not (defer_checksums and options.verify_checksums):
        manifest = load_artifact(resolved.path, verify=options.verify_checksums)
        return StageInput(resolved=resolved, manifest=manifest)
    manifest = load_artifact(resolved.path, verify=False)
    check_file_list(resolved.path, manifest)
    checks = BackgroundChecksums(resolved.path, manifest)
    return StageInput(resolved=resolved, manifest=manifest, checksum_check=checks)


@contextmanager
def verified_input(inp: StageInput) -> Iterator[None]:
    """Run the body while the input's deferred checksums are hashed in a background thread,
    then wait for them. If the body fails and the input turns out damaged, the checksum error
    is raised instead, since it explains the failure; on Ctrl-C the hashing is abandoned."""
    if inp.checksum_check is not None:
        inp.checksum_check.start()
    try:
        yield
    except Exception:
        inp.wait_verified()
        raise
    except BaseException:
        if inp.checksum_check is not None:
            inp.checksum_check.cancel()
        raise
    inp.wait_verified()


#: The dtypes of weights that can be factorized, and that merge writes back.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

#: Tensor name -> shape, as the files of a checkpoint or artifact hold them (`tensor_shapes`).
TensorShapes = Mapping[str, Sequence[int]]


def _layout_key(config_file: Path) -> str | None:
    """The cache key of the layout of the model `config_file` describes; None for a config
    that cannot be read as a JSON object (`read_config` reports what is wrong with it)."""
    try:
        data = json.loads(config_file.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    config = json.dumps(unmarked_config(data), sort_keys=True)
    return record_key(str(LAYOUT_FORMAT), __version__, metadata.version("transformers"), config)


def tensor_shapes(inp: StageInput) -> dict[str, tuple[int, ...]]:
    """Every tensor of the input's files with its shape, read from the headers. A header that
    cannot be read in an artifact whose checksums are still to be checked is reported as the
    checksum mismatch it is (that error names the damaged file and explains the failure)."""
    try:
        with open_tensors(inp.path) as reader:
            return {key: reader.shape(key) for key in reader.keys()}
    except ArtifactError:
        inp.wait_verified()
        raise


def model_layout(path: Path, shapes: TensorShapes | None = None) -> ModelLayout:
    """The module layout of the model that `path/config.json` describes; with `shapes` (the
    weights it came with, from `tensor_shapes`), checked against them (an artifact's MPO modules
    are checked by `check_mpo_records`). Stages always pass `shapes`.

    Reading it off a meta model means importing the `transformers` modeling stack (seconds),
    so the layout is cached, keyed by the config (`unmarked_config`: an artifact shares its
    base checkpoint's entry, so the first merge of a fresh decomposition finds it) and the
    versions of transformers, mposurgeon and the layout format: the same config gives the same
    model class. A config that disagrees with the weights (layer counts, sizes) is refused,
    cached or not, and one that describes a far larger model is refused while it is being built.
    """
    key = _layout_key(path / "config.json")
    layout = None
    if key is not None and (record := read_record("layouts", key)) is not None:
        with suppress(ValueError):  # a record from elsewhere or damaged: rebuilt below
            layout = ModelLayout.from_dict(record)
    if layout is None:
        from mposurgeon.artifact.config import read_config
        from mposurgeon.models.layout import build_meta_model, describe_model

        layout = describe_model(build_meta_model(read_config(path), file_keys=shapes))
        if key is not None:
            write_record("layouts", key, layout.to_dict())
    if shapes is not None:
        check_layout_files(layout, shapes)
    return layout


def check_no_dense_twin(records: Mapping[str, ModuleRecord], keys: Collection[str]) -> None:
    """Refuse a module whose weight is a dense tensor of the files (`keys`) as well, unless
    its record owns that tensor (a LoRA module keeps its base weight) or keeps it (an
    adapter follows the module)."""
    for name, rec in records.items():
        owned = rec.weight_key in rec.tensor_shapes() or rec.keeps_weight
        if rec.weight_key in keys and not owned:
            raise ArtifactError(
                f"{MANIFEST_NAME} has an invalid field modules.{name}: its weight "
                f"{rec.weight_key} is a dense tensor in the files as well",
                hint="re-create the artifact with the stage that made it, or restore it",
            )


def check_mpo_records(
    layout: ModelLayout, records: Mapping[str, ModuleRecord], shapes: TensorShapes
) -> None:
    """Every MPO module of an artifact is a module of its config's model with the kind (linear,
    conv1d, embedding) and weight shape its record gives (merge orients the weight by them),
    and its weight is not also a dense tensor of the files (`shapes`)."""
    check_no_dense_twin(records, shapes)
    keys = set(shapes) | {rec.weight_key for rec in records.values()}
    to_file = file_key_mapper(layout, keys)
    modules = {to_file(f"{m.name}.weight"): m for m in layout.modules}
    for name, rec in records.items():
        module = modules.get(rec.weight_key)
        if module is None:
            problem = (
                f"the model of its config.json ({layout.class_name}) has no Linear, Conv1D or "
                f"Embedding {name}"
            )
        elif module.kind != rec.kind:
            problem = f"kind {rec.kind!r}, but {name} is a {module.kind} of {layout.class_name}"
        elif tuple(rec.shape) != module.shape:
            problem = (
                f"shape {list(rec.shape)}, but config.json makes {name} "
                f"{module.shape[0]}x{module.shape[1]}"
            )
        else:
            continue
        raise ArtifactError(
            f"{MANIFEST_NAME} has an invalid field modules.{name}: {problem}",
            hint="re-create the artifact with the stage that made it, or restore it",
        )


def plan_output(inp: StageInput, options: StageOptions, stage: str) -> Path:
    """The directory this stage will write, checked against the input and existing files.

    Without `-o` it is the next version directory under the workdir (the model name made one
    safe path component), claimed at once so that a concurrent run takes the next number.
    """
    if options.output is None:
        out = claim_version_dir(options.workdir, inp.base.name, stage)
    else:
        out = options.output
    try:
        check_output_dir(out, inputs=[inp.path], overwrite=options.overwrite)
    except BaseException:
        release_claim(out)
        raise
    return out


def stage_options_record(options: BaseModel) -> dict[str, Any]:
    """The stage's options as JSON-able data for the manifest (paths as strings)."""
    return options.model_dump(mode="json")


def finish_artifact(
    directory: Path,
    *,
    inp: StageInput,
    stage: str,
    options: BaseModel,
    modules: dict[str, ModuleRecord],
    known_checksums: dict[str, str] | None = None,
    selection: SelectionRecord | None = None,
    **extra: Any,
) -> Manifest:
    """Copy the base's files, mark the config of an output with module records as an
    artifact's (`artifact/config.py`; a merged checkpoint's stays loadable), write the card
    (`stages/card.py`) and the manifest (with checksums).

    First waits for the input's deferred checksum check: nothing is built on a damaged input.
    `known_checksums` (from `ShardedWriter.checksums()`) spare hashing the shards again;
    `selection` is recorded as it is, `extra` (metrics) set on the manifest.
    """
    inp.wait_verified()
    copy_model_files(inp.path, directory)
    set_artifact_mark(directory, marked=bool(modules))  # see artifact/config.py
    manifest = new_manifest(
        stage=stage,
        options=stage_options_record(options),
        base=inp.base,
        parent_manifest=inp.manifest,
        parent_path=inp.path if inp.manifest is not None else None,
        modules=modules,
    )
    manifest.selection = selection
    for key, value in extra.items():
        setattr(manifest, key, value)
    write_model_card(
        directory,
        manifest,
        source=inp.path,
        parent=inp.manifest,
        repo_id=getattr(options, "push_to_hub", None),
    )
    write_manifest(directory, manifest, known=known_checksums)
    return manifest


def write_live_model(
    out: Path,
    method: Method,
    net: nn.Module,
    tokenizer: Any,
    inp: StageInput,
    opts: StageOptions,
    records: dict[str, ModuleRecord],
    metrics: dict[str, Any],
    selection: SelectionRecord | None,
    masks: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {}),
    *,
    stage: str,
) -> None:
    """Write a live model as the artifact `out` of `stage`: its tensors (live names as
    `method.file_key` stores them, tied tensors once), config, tokenizer (if any) and manifest
    with `records` (live names); `masks` (zeroed by live parameter name, kept by stored key):
    pruned entries written as zeros, and the masks kept."""
    zeroed, kept = masks
    config = net.config  # type: ignore[attr-defined]
    config.architectures = [type(net).__name__]
    with atomic_directory(out, overwrite=opts.overwrite) as tmp:
        tensors, _ = unique_state_dict(net)
        with ShardedWriter(tmp, opts.shard_size(inp.path)) as writer:
            for key, tensor in tensors.items():
                if key in zeroed:
                    tensor = tensor.masked_fill(zeroed[key].to(tensor.device), 0)
                writer.add(method.file_key(key), tensor)
            for key, mask in kept.items():
                writer.add(key, mask)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finish_artifact(
            tmp,
            inp=inp,
            stage=stage,
            options=opts,
            modules=records,
            known_checksums=writer.checksums(),
            metrics=metrics,
            selection=selection,
        )
