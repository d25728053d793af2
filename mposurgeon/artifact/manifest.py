"""The artifact manifest `mposurgeon.json`: schema, versions and migration, lineage, checksums."""

from __future__ import annotations

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
    PlainValidator,
    PositiveInt,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import to_jsonable_python
from typing_extensions import TypedDict

from mposurgeon._version import __version__
from mposurgeon.artifact.jsonfile import read_json_object
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
from mposurgeon.methods.records import ModuleName, ModuleRecord
from mposurgeon.methods.records import field_error as _field_error
from mposurgeon.methods.registry import method_names, record_class

FORMAT = "mposurgeon-artifact"
FORMAT_VERSION = 2
#: Re-exported: MANIFEST_NAME is defined in `store` (which writes it too), the records in
#: `methods` (each method owns its record class).
__all__ = ["MANIFEST_NAME", "ModuleRecord"]

#: Files whose presence changes what a loader reads: they must all be listed in `files`.
TENSOR_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")

#: A JSON object; values such as Path or tuple become their JSON form (str, list) on the way in,
#: so a manifest in memory equals the one read back from disk (recipes compare options).
JsonDict = Annotated[dict[str, Any], BeforeValidator(to_jsonable_python)]

#: How deep a manifest's JSON may nest (the deepest a stage writes is about 6).
MAX_DEPTH = 32


class _Record(BaseModel):
    # Newer minor versions may add fields: keep them instead of failing, but validate known ones.
    model_config = ConfigDict(extra="allow")


def _module_record(value: Any) -> ModuleRecord:
    """A module record as the class of the method that owns it (`method`) validates it."""
    if isinstance(value, ModuleRecord):
        return value
    if not isinstance(value, dict):
        raise ValueError("a module record is a JSON object")
    method = value.get("method")
    cls = record_class(method) if isinstance(method, str) else None
    if cls is None:
        known = ", ".join(n for n in method_names() if record_class(n) is not None)
        raise _field_error(
            "method",
            f"{method!r} is not a method this mposurgeon knows ({known}): upgrade mposurgeon",
        )
    return cls.model_validate(value)


#: A module record of any registered method.
AnyModuleRecord = Annotated[SerializeAsAny[ModuleRecord], PlainValidator(_module_record)]


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


class _Recorded(_Record):
    """A record that writes back the keys it was given (read or built with), no defaults
    filled in: a manifest read and written again keeps its shape."""

    @model_serializer(mode="wrap")
    def _given_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if key in self.model_fields_set}


class DataRef(_Recorded):
    """A data file a selection was scored on."""

    path: str | None = None
    sha256: str | None = None


class SelectionRound(_Recorded):
    """One round of a dynamic selection: its epoch, and what it chose (None: not yet)."""

    round: int | None = None
    epoch: int | None = None
    chosen: list[ModuleName] | None = None


class SelectionSchedule(_Recorded):
    """The rounds of a dynamic selection (`split_num` > 1)."""

    split_num: PositiveInt
    per_round: NonNegativeInt
    epochs: int | None = None
    interval: int | None = None
    rounds: list[SelectionRound]


class SelectionRecord(_Recorded):
    """The manifest's `selection` (written by `select` and dynamic `train`): which matrices
    were chosen (`chosen`, by module name), by what `method`, their `scores` and weight
    `patterns`; read by decompose, train and inspect."""

    method: str | None = None
    weight_types: list[str] = []
    top_n: NonNegativeInt | None = None
    split_num: PositiveInt | None = None
    seed: int | None = None
    data: DataRef | None = None
    scores: dict[ModuleName, float] = {}
    patterns: dict[ModuleName, str] = {}
    chosen: list[ModuleName] = []
    schedule: SelectionSchedule | None = None

    @property
    def has_choice(self) -> bool:
        """Whether the record says what was chosen (`chosen` given, possibly empty)."""
        return "chosen" in self.model_fields_set


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

    method: str
    task: str  # absent in artifacts trained before tasks: classification
    steps: NonNegativeInt
    epochs: float
    final_loss: float | None
    loss_history: list[_LossPoint]
    eval: list[dict[str, Any]]
    eval_accuracy: float | None
    eval_macro_f1: float | None
    eval_mcc: float | None  # Matthews correlation; absent in artifacts trained before it
    eval_loss: float | None
    best_metric: str | None  # --select-best: the metric, and the step of the weights kept
    best_step: NonNegativeInt | None
    trainable_params: NonNegativeInt | None
    total_params: NonNegativeInt | None
    trainable_fraction: float | None
    seed: int | None
    lr: float | None
    method_options: dict[str, Any] | None
    batch_size: PositiveInt | None
    num_processes: PositiveInt | None
    train_rows: NonNegativeInt | None
    eval_rows: NonNegativeInt | None
    resumed_from_step: int | None
    modules: NonNegativeInt | None
    verify: _Verify | None


#: The figures a train stage always records, read together by `inspect`.
_TRAIN_METRICS = (
    "method",
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
    """Contents of `mposurgeon.json` (format version 2: every module record names the method
    that owns it)."""

    format: Literal["mposurgeon-artifact"]
    format_version: int
    stage: str
    created_at: str
    tool_version: str
    options: JsonDict
    base: BaseInfo
    parent: ParentInfo | None
    lineage: list[LineageEntry]
    modules: dict[str, AnyModuleRecord]
    files: dict[str, str]
    selection: SelectionRecord | None = None
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
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 knew only MPO modules and three training modes: each record becomes owned by
    the `mpo` method; train metrics name the method (`mode`), its options (`mpo_lr`), and
    count the modules (`mpo_modules`)."""
    modules = data.get("modules")
    if isinstance(modules, dict):
        data["modules"] = {
            k: {"method": "mpo", **v} if isinstance(v, dict) else v for k, v in modules.items()
        }
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and "mode" in metrics:
        metrics = dict(metrics)
        metrics["method"] = metrics.pop("mode")
        options = {"lr": metrics.get("lr"), "mpo_lr": metrics.pop("mpo_lr", None)}
        metrics["method_options"] = options
        if "mpo_modules" in metrics:
            metrics["modules"] = metrics.pop("mpo_modules")
        data["metrics"] = metrics
    return data


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


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
    """Every module record has all its tensors in the files, with the shapes the record gives,
    and every tensor named as some method's state belongs to a record (headers only)."""
    records = manifest.modules
    where = Path(directory) / MANIFEST_NAME
    try:
        reader = open_tensors(directory)
    except ArtifactError:
        return  # a damaged tensor file: the checksum check (or the stage's read) reports it
    classes = {cls for name in method_names() if (cls := record_class(name)) is not None}
    owned: set[str] = set()
    with reader:
        keys = set(reader.keys())
        for name, rec in records.items():
            for key, expected in rec.tensor_shapes().items():
                owned.add(key)
                if key not in keys:
                    raise ArtifactError(
                        f"{where} has an invalid field modules.{name}: its tensor {key} "
                        "is not in the tensor files",
                        hint=_DAMAGED_HINT,
                    )
                if tuple(reader.shape(key)) != tuple(expected):
                    raise ArtifactError(
                        f"{where} has an invalid field modules.{name}: tensor {key} has "
                        f"shape {list(reader.shape(key))}, the record says {list(expected)}",
                        hint=_DAMAGED_HINT,
                    )
        for key in sorted(keys - owned):
            if any(cls.tensor_owner(key) is not None for cls in classes):
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
