"""The artifact manifest `mposurgeon.json`: schema, versions and migration, lineage, checksums."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from mposurgeon._version import __version__
from mposurgeon.artifact.store import checksum_files, sha256_file
from mposurgeon.errors import ArtifactError

FORMAT = "mposurgeon-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "mposurgeon.json"

#: Files whose presence changes what a loader reads: they must all be listed in `files`.
TENSOR_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")

#: A JSON object; values such as Path or tuple become their JSON form (str, list) on the way in,
#: so a manifest in memory equals the one read back from disk (recipes compare options).
JsonDict = Annotated[dict[str, Any], BeforeValidator(to_jsonable_python)]


class _Record(BaseModel):
    # Newer minor versions may add fields: keep them instead of failing, but validate known ones.
    model_config = ConfigDict(extra="allow")


class ModuleRecord(_Record):
    """One transformed weight matrix: where it came from and its MPO structure.

    Dimensions are counts of rows/columns; `shape` is the weight as stored in the original
    file (Conv1D stores (in, out)); modes multiply to the padded dimensions
    (`prod(out_modes) == out_dim + out_padding`).
    """

    name: str
    kind: Literal["linear", "conv1d", "embedding"]
    weight_key: str
    shape: list[int]
    dtype: str
    out_dim: int
    in_dim: int
    out_modes: list[int]
    in_modes: list[int]
    out_padding: int
    in_padding: int
    bonds: list[int]
    central_index: int
    trainable: list[int] = []
    rel_error: float | None = None
    predicted_error: float | None = None
    params: int
    dense_params: int
    entropy: list[float] = []
    tied_keys: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> ModuleRecord:
        n = len(self.out_modes)
        problems = []
        if len(self.in_modes) != n or n == 0:
            problems.append(
                f"out_modes {self.out_modes} and in_modes {self.in_modes} differ in length"
            )
        if len(self.bonds) != n + 1:
            problems.append(f"bonds {self.bonds} should have {n + 1} entries")
        if not 0 <= self.central_index < max(n, 1):
            problems.append(f"central_index {self.central_index} is not a core index")
        if any(not 0 <= i < n for i in self.trainable):
            problems.append(f"trainable {self.trainable} names cores outside 0..{n - 1}")
        if self.out_modes and math.prod(self.out_modes) != self.out_dim + self.out_padding:
            problems.append(f"out_modes {self.out_modes} do not multiply to out_dim + out_padding")
        if self.in_modes and math.prod(self.in_modes) != self.in_dim + self.in_padding:
            problems.append(f"in_modes {self.in_modes} do not multiply to in_dim + in_padding")
        if math.prod(self.shape) != self.out_dim * self.in_dim:
            problems.append(f"shape {self.shape} does not hold out_dim x in_dim")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BaseInfo(_Record):
    """The checkpoint the lineage started from."""

    name: str
    model_id: str | None
    revision: str | None
    path: str


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
    selection: JsonDict | None = None
    metrics: JsonDict | None = None


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
    (Path(directory) / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


def _bad(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path} {what}",
        hint="re-create the artifact with the stage that made it, or restore it from a copy",
    )


def read_manifest(directory: Path) -> Manifest:
    """Read and validate `directory/mposurgeon.json`, migrating older format versions."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(
            f"no {MANIFEST_NAME} in {directory}: not an mposurgeon artifact",
            hint="pass an artifact directory written by an mposurgeon stage",
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise _bad(path, f"cannot be read ({err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _bad(
            path, f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, dict):
        raise _bad(path, "is not a JSON object")
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
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
        raise _bad(path, f"has an invalid field {field}: {first['msg']}{more}") from None


def manifest_sha256(directory: Path) -> str:
    """sha256 of `directory/mposurgeon.json`, which identifies an artifact in lineages."""
    return sha256_file(Path(directory) / MANIFEST_NAME)


def _is_tensor_file(name: str) -> bool:
    return name.endswith(TENSOR_FILE_SUFFIXES)


_DAMAGED_HINT = "re-create the artifact with the stage that made it, or restore it from a copy"


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that every listed file exists with its sha256 and that no tensor file is unlisted."""
    check_file_list(directory, manifest)
    check_checksums(directory, manifest)


def check_file_list(directory: Path, manifest: Manifest) -> None:
    """The cheap half of `verify_files`: every listed file exists, no tensor file is unlisted."""
    directory = Path(directory)
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
        if path.is_file() and _is_tensor_file(path.name) and rel_name not in manifest.files:
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


def load_artifact(directory: Path, *, verify: bool = True) -> Manifest:
    """Read the manifest of the artifact in `directory` and, unless `verify=False`, check files."""
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    return manifest
