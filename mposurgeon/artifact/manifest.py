"""The artifact manifest `mposurgeon.json`: schema, versions and migration, lineage, checksums."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, to_jsonable_python
from typing_extensions import Required, TypedDict

from mposurgeon._version import __version__
from mposurgeon.artifact.jsonfile import read_json_object
from mposurgeon.artifact.naming import CORE_KEY, core_key
from mposurgeon.artifact.store import (
    MANIFEST_NAME,
    MODEL_FILES,
    artifact_symlinks,
    checksum_files,
    sha256_file,
    write_error,
)
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import ArtifactError

FORMAT = "mposurgeon-artifact"
FORMAT_VERSION = 1
__all__ = ["MANIFEST_NAME"]  # re-exported: defined in `store`, which writes it too

#: Files whose presence changes what a loader reads: they must all be listed in `files`.
TENSOR_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")

#: A JSON object; values such as Path or tuple become their JSON form (str, list) on the way in,
#: so a manifest in memory equals the one read back from disk (recipes compare options).
JsonDict = Annotated[dict[str, Any], BeforeValidator(to_jsonable_python)]

#: How deep a manifest's JSON may nest (the deepest a stage writes is about 6).
MAX_DEPTH = 32

#: Float dtypes a module's original weight may have (what merge casts back to).
FloatDtype = Literal["float16", "bfloat16", "float32", "float64"]

_MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _module_name(value: str) -> str:
    """A dotted module path like `encoder.layer.0.output.dense`: no `/`, no empty parts."""
    if not _MODULE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a dotted module name (letters, digits, _ and - between dots)"
        )
    return value


#: A module (or tensor) name: a dotted path, never a file path.
ModuleName = Annotated[str, AfterValidator(_module_name)]


def _field_error(field: str, text: str) -> PydanticCustomError:
    """A validation error about `field` (relative to the record being validated)."""
    return PydanticCustomError("manifest_field", "{field}: {text}", {"field": field, "text": text})


class _Record(BaseModel):
    # Newer minor versions may add fields: keep them instead of failing, but validate known ones.
    model_config = ConfigDict(extra="allow")


class ModuleRecord(_Record):
    """One transformed weight matrix: where it came from and its MPO structure.

    Dimensions are counts of rows/columns; `shape` is the weight as stored in the original
    file (Conv1D stores (in, out)); modes multiply to the padded dimensions
    (`prod(out_modes) == out_dim + out_padding`).
    """

    name: ModuleName
    kind: Literal["linear", "conv1d", "embedding"]
    weight_key: ModuleName
    shape: list[PositiveInt]
    dtype: FloatDtype
    out_dim: PositiveInt
    in_dim: PositiveInt
    out_modes: list[PositiveInt]
    in_modes: list[PositiveInt]
    out_padding: NonNegativeInt
    in_padding: NonNegativeInt
    bonds: list[PositiveInt]
    central_index: int
    trainable: list[int] = []
    rel_error: float | None = None
    predicted_error: float | None = None
    params: NonNegativeInt
    dense_params: NonNegativeInt
    entropy: list[float] = []
    tied_keys: list[ModuleName] = []

    @model_validator(mode="after")
    def _consistent(self) -> ModuleRecord:
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
        if any(not 0 <= i < n for i in self.trainable):
            problems.append(("trainable", f"{self.trainable} names cores outside 0..{n - 1}"))
        if self.out_modes and math.prod(self.out_modes) != self.out_dim + self.out_padding:
            problems.append(
                ("out_modes", f"{self.out_modes} do not multiply to out_dim + out_padding")
            )
        if self.in_modes and math.prod(self.in_modes) != self.in_dim + self.in_padding:
            problems.append(("in_modes", f"{self.in_modes} do not multiply to in_dim + in_padding"))
        # Conv1D stores its weight as (in, out); linear and embedding weights as (out, in).
        conv1d = self.kind == "conv1d"
        stored = [self.in_dim, self.out_dim] if conv1d else [self.out_dim, self.in_dim]
        if self.shape != stored:
            order = "[in_dim, out_dim]" if conv1d else "[out_dim, in_dim]"
            problems.append(
                ("shape", f"{self.shape} is not {order} = {stored} of a {self.kind} weight")
            )
        if self.weight_key != f"{self.name}.weight":
            problems.append(("weight_key", f"{self.weight_key!r} is not {self.name + '.weight'!r}"))
        if problems:
            field, first = problems[0]
            more = "".join(f"; {f} {text}" for f, text in problems[1:])
            raise _field_error(field, first + more)
        return self


class BaseInfo(_Record):
    """The checkpoint the lineage started from."""

    name: str
    model_id: str | None
    revision: str | None
    path: str

    @field_validator("name")
    @classmethod
    def _one_component(cls, value: str) -> str:
        # The default output directory is named after it: never a path of its own.
        if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
            raise ValueError(f"{value!r} is not a model name (one directory name, no / or ..)")
        return value


class ParentInfo(_Record):
    """The artifact this one was made from."""

    path: str
    manifest_sha256: str
    stage: str


class LineageEntry(_Record):
    """One stage in the history of an artifact."""

    stage: str
    created_at: str
    tool_version: str
    options: JsonDict
    parent_manifest_sha256: str | None


class _Open(TypedDict, total=False):
    # Keys a stage does not know are kept as they are (a newer minor version may add some).
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]


class _DataRef(_Open, total=False):
    path: str
    sha256: str


class _Round(_Open, total=False):
    round: int
    epoch: int | None
    chosen: list[ModuleName] | None


class _Schedule(_Open, total=False):
    split_num: Required[PositiveInt]
    per_round: Required[NonNegativeInt]
    epochs: int | None
    interval: int | None
    rounds: Required[list[_Round]]


class SelectionRecord(_Open, total=False):
    """The manifest's `selection` (written by `select` and dynamic `train`): what its readers
    (decompose, train, inspect) rely on."""

    method: str | None
    weight_types: list[str]
    top_n: NonNegativeInt | None
    split_num: PositiveInt | None
    seed: int | None
    data: _DataRef | None
    scores: dict[ModuleName, float]
    patterns: dict[ModuleName, str]
    chosen: list[ModuleName]
    schedule: _Schedule | None


class _LossPoint(_Open, total=False):
    step: int
    loss: float | None


class _Verify(_Open, total=False):
    max_abs_diff: float | None
    max_abs_value: float | None
    tolerance: float | None
    ok: bool


class MetricsRecord(_Open, total=False):
    """The manifest's `metrics` (written by `train`, and `merge --verify`): the types of the
    figures that inspect, recipes and gates read."""

    mode: str
    steps: NonNegativeInt
    epochs: float
    final_loss: float | None
    loss_history: list[_LossPoint]
    eval: list[dict[str, Any]]
    eval_accuracy: float | None
    eval_macro_f1: float | None
    eval_loss: float | None
    trainable_params: NonNegativeInt | None
    total_params: NonNegativeInt | None
    trainable_fraction: float | None
    seed: int | None
    lr: float | None
    mpo_lr: float | None
    batch_size: PositiveInt | None
    num_processes: PositiveInt | None
    train_rows: NonNegativeInt | None
    eval_rows: NonNegativeInt | None
    resumed_from_step: int | None
    mpo_modules: NonNegativeInt | None
    verify: _Verify | None


#: The figures a train stage always records, read together by `inspect`.
_TRAIN_METRICS = (
    "mode",
    "steps",
    "epochs",
    "trainable_params",
    "total_params",
    "trainable_fraction",
)
_EVAL_METRICS = ("eval_macro_f1", "eval_loss", "eval_rows")


def _complete_metrics(metrics: MetricsRecord) -> MetricsRecord:
    """Train metrics come whole: one of the train figures needs the others (and an eval
    accuracy the other eval figures), as `inspect` shows them together."""
    if any(key in metrics for key in _TRAIN_METRICS):
        for key in _TRAIN_METRICS:
            if metrics.get(key) is None:
                raise _field_error(key, "missing from the metrics of a train stage")
    if metrics.get("eval_accuracy") is not None:
        for key in _EVAL_METRICS:
            if metrics.get(key) is None:
                raise _field_error(key, "missing beside eval_accuracy")
    return metrics


class Manifest(_Record):
    """Contents of `mposurgeon.json` (format version 1)."""

    format: Literal["mposurgeon-artifact"]
    format_version: int
    stage: str
    created_at: str
    tool_version: str
    options: JsonDict
    base: BaseInfo
    parent: ParentInfo | None
    lineage: list[LineageEntry]
    modules: dict[str, ModuleRecord]
    files: dict[str, str]
    selection: Annotated[SelectionRecord, BeforeValidator(to_jsonable_python)] | None = None
    metrics: (
        Annotated[
            MetricsRecord,
            BeforeValidator(to_jsonable_python),
            AfterValidator(lambda m: _complete_metrics(m)),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _keys_are_names(self) -> Manifest:
        for key, record in self.modules.items():
            if key != record.name:
                raise _field_error(
                    f"modules.{key}.name", f"{record.name!r} differs from its key {key!r}"
                )
        return self


#: Upgrades of the raw JSON: MIGRATIONS[v] turns a version-v manifest into version v + 1.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _migrate(data: dict[str, Any], version: int) -> dict[str, Any]:
    while version < FORMAT_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["format_version"] = version
    return data


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_manifest(
    *,
    stage: str,
    options: Mapping[str, Any],
    base: BaseInfo,
    parent_manifest: Manifest | None,
    parent_path: Path | None,
    modules: Mapping[str, ModuleRecord] | Iterable[ModuleRecord],
) -> Manifest:
    """A manifest for a new artifact made by `stage`; `files` is filled by `write_manifest`.

    With a parent artifact (`parent_manifest` read from `parent_path`) the lineage continues the
    parent's; otherwise it starts here.
    """
    if (parent_manifest is None) != (parent_path is None):
        raise ValueError("parent_manifest and parent_path go together")
    created_at = _utc_now()
    parent = None
    lineage: list[LineageEntry] = []
    if parent_manifest is not None and parent_path is not None:
        parent = ParentInfo(
            path=str(parent_path),
            manifest_sha256=manifest_sha256(parent_path),
            stage=parent_manifest.stage,
        )
        lineage = [entry.model_copy(deep=True) for entry in parent_manifest.lineage]
    lineage.append(
        LineageEntry(
            stage=stage,
            created_at=created_at,
            tool_version=__version__,
            options=dict(options),
            parent_manifest_sha256=parent.manifest_sha256 if parent else None,
        )
    )
    if isinstance(modules, Mapping):
        module_map = dict(modules)
    else:
        module_map = {record.name: record for record in modules}
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        stage=stage,
        created_at=created_at,
        tool_version=__version__,
        options=dict(options),
        base=base,
        parent=parent,
        lineage=lineage,
        modules=module_map,
        files={},
    )


def write_manifest(
    directory: Path, manifest: Manifest, known: Mapping[str, str] | None = None
) -> None:
    """Checksum every file in `directory` into `manifest.files` (in place), then write the manifest.

    `known` digests by relative path are used as they are. Write the manifest last: files added
    afterwards are not covered by its checksums.
    """
    manifest.files = checksum_files(directory, exclude=(MANIFEST_NAME,), known=known)
    text = manifest.model_dump_json(indent=2)
    path = Path(directory) / MANIFEST_NAME
    try:
        path.write_text(text + "\n", encoding="utf-8")
    except OSError as err:
        raise write_error(path, err) from err


def _bad(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path} {what}",
        hint="re-create the artifact with the stage that made it, or restore it from a copy",
    )


def read_manifest(directory: Path) -> Manifest:
    """Read and validate `directory/mposurgeon.json`, migrating older format versions."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"no {MANIFEST_NAME} in {directory}: not an mposurgeon artifact",
            hint="pass an artifact directory written by an mposurgeon stage",
        )
    data = read_json_object(path, lambda what: _bad(path, what))
    if (deep := _too_deep(data)) is not None:
        raise _bad(path, f"has an invalid field {deep}: nested deeper than {MAX_DEPTH} levels")
    if data.get("format") != FORMAT:
        raise _bad(path, f"has format {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(path, f"has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format_version {version} is newer than this mposurgeon supports "
            f"({FORMAT_VERSION})",
            hint="upgrade mposurgeon: pip install -U mposurgeon",
        )
    data = _migrate(data, version)
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        parts = [str(part) for part in first["loc"]]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "manifest_field":
            ctx = first.get("ctx") or {}
            parts.append(str(ctx.get("field")))
            message = str(ctx.get("text"))
        field = ".".join(parts) or "(top level)"
        others = err.error_count() - 1
        more = f" (and {others} more problem{'s' * (others > 1)})" if others else ""
        raise _bad(path, f"has an invalid field {field}: {message}{more}") from None


def _too_deep(data: Any) -> str | None:
    """The path of the first value nested deeper than MAX_DEPTH in `data`, else None."""
    stack: list[tuple[Any, list[str]]] = [(data, [])]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_DEPTH:
            shown = ".".join(where[:3])
            return f"{shown}..." if len(where) > 3 else shown
        if isinstance(value, dict):
            stack.extend((v, [*where, str(k)]) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, [*where, str(i)]) for i, v in enumerate(value))
    return None


def manifest_sha256(directory: Path) -> str:
    """sha256 of `directory/mposurgeon.json`, which identifies an artifact in lineages."""
    return sha256_file(Path(directory) / MANIFEST_NAME)


def _is_tensor_file(name: str) -> bool:
    return name.endswith(TENSOR_FILE_SUFFIXES)


def _is_loaded_file(rel_name: str) -> bool:
    """A file a loader reads: any tensor file, or a config/tokenizer file at the top level."""
    return _is_tensor_file(rel_name) or rel_name in MODEL_FILES


_DAMAGED_HINT = "re-create the artifact with the stage that made it, or restore it from a copy"


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that every listed file exists with its sha256 and that no tensor file is unlisted."""
    check_file_list(directory, manifest)
    check_checksums(directory, manifest)


def check_file_list(directory: Path, manifest: Manifest) -> None:
    """The cheap half of `verify_files`: every listed file exists, no tensor, config or
    tokenizer file is unlisted, and no file is a symbolic link (except in a Hugging Face cache
    snapshot, whose files are links to its blobs)."""
    directory = Path(directory)
    links = artifact_symlinks(directory)
    if links:
        raise ArtifactError(
            f"{links[0]} in {directory} is a symbolic link: an artifact holds regular files only",
            hint=f"remove {links[0]}, or re-create the artifact",
        )
    for name in manifest.files:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(
                f"{MANIFEST_NAME} lists a file outside the artifact: {name}", hint=_DAMAGED_HINT
            )
        if not (directory / rel).is_file():
            raise ArtifactError(
                f"{name} is listed in {MANIFEST_NAME} but missing", hint=_DAMAGED_HINT
            )
    for path in sorted(directory.rglob("*")):
        rel_name = path.relative_to(directory).as_posix()
        if path.is_file() and _is_loaded_file(rel_name) and rel_name not in manifest.files:
            raise ArtifactError(
                f"{rel_name} is not listed in {MANIFEST_NAME}: the artifact was modified",
                hint=f"remove {rel_name}, or re-create the artifact",
            )


def check_checksums(
    directory: Path, manifest: Manifest, cancel: threading.Event | None = None
) -> None:
    """The costly half of `verify_files`: every listed file has its recorded sha256.

    Raises ArtifactError for a mismatch, HashCancelled once `cancel` is set."""
    for name, expected in manifest.files.items():
        if sha256_file(Path(directory) / name, cancel) != expected:
            raise ArtifactError(
                f"{name} does not match its checksum in {MANIFEST_NAME}: "
                "the artifact was modified or corrupted",
                hint=f"{_DAMAGED_HINT}; --no-verify skips this check at your own risk",
            )


class BackgroundChecksums:
    """`check_checksums` of one artifact in a daemon thread, so hashing overlaps other work.

    `start()` begins it; `wait()` returns when it has passed and raises its ArtifactError if it
    failed (it runs the check in the caller's thread if it was never started); `cancel()` makes
    a started check stop at its next chunk, e.g. when the work it overlapped was interrupted.
    """

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self._directory, self._manifest = Path(directory), manifest
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._passed = False

    def start(self) -> None:
        if self._thread is None and not self._passed:
            self._thread = threading.Thread(
                target=self._run, name="mposurgeon-checksums", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            check_checksums(self._directory, self._manifest, self._cancel)
            self._passed = True
        except BaseException as err:  # handed to the waiting thread
            self._error = err

    def wait(self) -> None:
        if self._thread is None:
            if not self._passed:
                check_checksums(self._directory, self._manifest)
                self._passed = True
            return
        self._thread.join()
        if self._error is not None:
            raise self._error
        if not self._passed:
            raise ArtifactError(f"the checksum check of {self._directory} did not finish")

    def cancel(self) -> None:
        self._cancel.set()


def check_cores(directory: Path, manifest: Manifest) -> None:
    """Every module record has all its cores in the tensor files, with the shapes its bonds
    and modes give, and every core in the files belongs to a record (headers only)."""
    records = manifest.modules
    where = Path(directory) / MANIFEST_NAME
    try:
        reader = open_tensors(directory)
    except ArtifactError:
        return  # a damaged tensor file: the checksum check (or the stage's read) reports it
    with reader:
        keys = set(reader.keys())
        for name, rec in records.items():
            for k in range(len(rec.out_modes)):
                key = core_key(name, k)
                expected = (rec.bonds[k], rec.out_modes[k], rec.in_modes[k], rec.bonds[k + 1])
                if key not in keys:
                    raise ArtifactError(
                        f"{where} has an invalid field modules.{name}: its core {key} "
                        "is not in the tensor files",
                        hint=_DAMAGED_HINT,
                    )
                if tuple(reader.shape(key)) != expected:
                    raise ArtifactError(
                        f"{where} has an invalid field modules.{name}: core {key} has "
                        f"shape {list(reader.shape(key))}, the record says {list(expected)}",
                        hint=_DAMAGED_HINT,
                    )
        for key in sorted(keys):
            match = CORE_KEY.fullmatch(key)
            if match is None:
                continue
            rec = records.get(match["module"])
            if rec is None or int(match["index"]) >= len(rec.out_modes):
                raise ArtifactError(
                    f"{key} in the tensor files belongs to no module of {where}",
                    hint=_DAMAGED_HINT,
                )


def load_artifact(directory: Path, *, verify: bool = True) -> Manifest:
    """Read the manifest of the artifact in `directory`, check its file list and that its
    records match its cores, and, unless `verify=False`, the files' checksums."""
    manifest = read_manifest(directory)
    check_file_list(directory, manifest)
    check_cores(directory, manifest)
    if verify:
        check_checksums(directory, manifest)
    return manifest
