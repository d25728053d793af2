"""Where artifacts go on disk: atomic directory writes, versioned paths, checksums, file copies."""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from mposurgeon.errors import ArtifactError, OutputError, OutputExistsError

#: The manifest file that makes a directory an artifact (its schema lives in `manifest`).
MANIFEST_NAME = "mposurgeon.json"

#: The config and tokenizer files a loader reads from a checkpoint's top level (an artifact
#: must list each it holds). Every other file of the base is kept too: see `copy_model_files`.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)

#: The files that hold a tokenizer's vocabulary: a checkpoint with none of them has no tokenizer.
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)

#: Endings of weight files (and their shard indexes). A stage writes the model's weights itself,
#: and weights in another format (ONNX, TensorFlow, Flax, GGUF, ...) would no longer match
#: them: none is ever copied from a base, except inside a sentence-transformers module folder.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".ot",
    ".tflite",
    ".index.json",
)

#: Top-level files of a base that a stage never copies: it writes its own manifest and card,
#: and a PEFT adapter config would describe adapter weights that are not copied.
NOT_COPIED = (MANIFEST_NAME, "README.md", "adapter_config.json")

#: The sentence-transformers pipeline file: its modules' folders are kept whole.
ST_MODULES_FILE = "modules.json"
_ST_MODULES_MAX_BYTES = 1 << 20  # a real one is a few hundred bytes

_VERSION_RE = re.compile(r"^v(\d+)-")

# -- write errors ----------------------------------------------------------------------------

#: errnos that only a write raises, with what to say and what to do about them.
_WRITE_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "no space left on device writing {path}",
        "free space on that file system, or write elsewhere with -o / -w",
    ),
    errno.EDQUOT: (
        "disk quota exceeded writing {path}",
        "free space within your quota, or write elsewhere with -o / -w",
    ),
    errno.EFBIG: (
        "file size limit exceeded writing {path}",
        "raise the limit (ulimit -f), or pass a smaller --max-shard-size",
    ),
    errno.EROFS: (
        "cannot write {path}: read-only file system",
        "choose a writable output with -o or -w",
    ),
}
_DENIED_ERRNOS = (errno.EACCES, errno.EPERM)


def write_error(path: Path | str, err: OSError | int) -> OutputError:
    """The one-line error for a failed write of `path` (`err`: the OSError or its errno)."""
    code = err if isinstance(err, int) else err.errno
    if code in _WRITE_ERRNOS:
        message, hint = _WRITE_ERRNOS[code]
        return OutputError(message.format(path=path), hint=hint, path=Path(path))
    if code in _DENIED_ERRNOS:
        return OutputError(
            f"cannot write {path}: permission denied",
            hint="choose a writable output with -o or -w",
            path=Path(path),
        )
    reason = os.strerror(code) if code else (str(err) or type(err).__name__)
    return OutputError(
        f"cannot write {path}: {reason}",
        hint="check the output directory and its file system",
        path=Path(path),
    )


def os_fault_error(err: OSError) -> OutputError | None:
    """The one-line error for a disk-full, size-limit, read-only or permission fault `err`
    raised anywhere (the CLI's last resort), else None. A permission fault may come from a
    read, so its message names the file without saying "write"."""
    path = err.filename if err.filename is not None else "the output"
    if err.errno in _WRITE_ERRNOS:
        return write_error(path, err)
    if err.errno in _DENIED_ERRNOS:
        return OutputError(
            f"{os.strerror(err.errno).lower()} on {path}",
            hint="check the permissions, or write elsewhere with -o / -w",
            path=Path(str(path)),
        )
    return None


def is_write_only_error(err: OSError) -> bool:
    """True for an OSError that only a write raises (no space, size limit, read-only FS)."""
    return err.errno in _WRITE_ERRNOS


# -- temporary siblings ----------------------------------------------------------------------

#: This host, so that a temporary directory is only judged by a process table that owns it.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: `.<final>.tmp-<host>-<pid>-<random>`: a temporary directory of a run of this tool.
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")


def _fsync_path(path: Path, *, directory: bool) -> None:
    """Flush `path` (a file or a directory entry table) to stable storage."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) cannot open directories; nothing to flush then
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                _fsync_path(path, directory=False)
        _fsync_path(Path(dirpath), directory=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{secrets.token_hex(4)}"


def _temp_sibling(final: Path) -> Path:
    """A fresh temporary sibling of `final` whose name records this host and process."""
    return final.parent / f".{final.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by another user
        return True
    return True


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary directories that killed runs of this tool left in `directory`.

    Only `.<name>.tmp-<host>-<pid>-<hex>` directories of this host whose process is gone are
    removed; a live run's, another host's, or an older unmarked one is left alone.
    """
    removed: list[Path] = []
    try:
        children = list(Path(directory).iterdir())
    except OSError:
        return removed
    for child in children:
        match = _TMP_RE.match(child.name)
        if not match or match["host"] != _HOST or _pid_alive(int(match["pid"])):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final`; on success fsync it and rename it to `final`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `final`
    is left untouched. An existing empty `final` is replaced; a non-empty one only with
    `overwrite=True` (the old directory is moved aside, the new one renamed in, the old deleted).
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err.filename or final.parent, err) from err
    clean_stale_temporaries(final.parent)
    tmp = _temp_sibling(final)
    try:
        tmp.mkdir()
    except OSError as err:
        raise write_error(final, err) from err
    try:
        try:
            yield tmp
        except OSError as err:
            if not is_write_only_error(err):
                raise
            raise write_error(_shown(err.filename, tmp, final), err) from err
        except OutputError as err:
            if not isinstance(err.path, Path) or not _is_within(err.path, tmp):
                raise
            raise _relocated(err, tmp, final) from err.__cause__
        try:
            _fsync_tree(tmp)
            _move_into_place(tmp, final, overwrite=overwrite)
        except OSError as err:
            raise write_error(_shown(err.filename, tmp, final), err) from err
    except BaseException:
        _remove(tmp)
        release_claim(final)
        raise
    release_claim(final, published=True)
    with contextlib.suppress(OSError):  # the rename is done; a failed flush cannot undo it
        _fsync_path(final.parent, directory=True)


def _shown(filename: str | os.PathLike[str] | None, tmp: Path, final: Path) -> Path:
    """`filename` (inside the temporary directory `tmp`) as the user knows it, under `final`."""
    if not filename:
        return final
    path = Path(filename)
    return final / path.relative_to(tmp) if _is_within(path, tmp) else path


def _relocated(err: OutputError, tmp: Path, final: Path) -> OutputError:
    """`err` (about a file in `tmp`) restated with the file's place in `final`."""
    path = Path(str(err.path))
    shown = _shown(path, tmp, final)
    return OutputError(str(err).replace(str(path), str(shown)), hint=err.hint, path=shown)


def _move_into_place(tmp: Path, final: Path, *, overwrite: bool) -> None:
    old: Path | None = None
    if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        try:
            os.rename(tmp, final)  # POSIX replaces an empty directory in one step
            return
        except OSError:
            final.rmdir()  # platforms that cannot rename onto a directory
    elif final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"{final} appeared while the stage ran and is not empty",
                hint="pass --overwrite to replace it, or choose another -o",
            )
        old = _sibling(final, "old")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)  # put the previous output back
        raise
    if old is not None:
        _remove(old)


#: Characters that never go into a directory name made from a name read from a file.
_UNSAFE_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_MAX_NAME = 128


def safe_component(name: str, what: str = "model name") -> str:
    """`name` as one safe path component: unsafe characters become `_`, long names are cut;
    an empty name, `.` or `..` is refused (ArtifactError naming `what`)."""
    cleaned = _UNSAFE_NAME_CHARS.sub("_", str(name)).strip()[:_MAX_NAME]
    if cleaned.strip(". ") == "":
        raise ArtifactError(
            f"{what} {name!r} cannot name a directory",
            hint="pass an output directory with -o",
        )
    return cleaned


def version_parent(workdir: Path, model_name: str) -> Path:
    """`<workdir>/<model_name>`, the model name made one safe path component."""
    return Path(workdir) / safe_component(model_name)


def next_version_dir(workdir: Path, model_name: str, stage: str) -> Path:
    """`<workdir>/<model_name>/v<N>-<stage>`, N one more than the highest `v<K>-*` there.

    `model_name` (often read from a manifest) becomes one safe path component, so the result
    always lies inside `workdir`.
    """
    parent = version_parent(workdir, model_name)
    highest = 0
    if parent.is_dir():
        for child in parent.iterdir():
            match = _VERSION_RE.match(child.name)
            if match and child.is_dir():
                highest = max(highest, int(match.group(1)))
    out = parent / f"v{highest + 1}-{safe_component(stage, 'stage name')}"
    if out.parent.parent != Path(workdir):  # cannot happen with one safe component
        raise ArtifactError(f"{out} would lie outside the workdir {workdir}")
    return out


#: Version directories this process claimed and has not published yet (removed at exit).
_CLAIMS: set[Path] = set()
_CLAIMS_LOCK = threading.Lock()


def claim_version_dir(workdir: Path, model_name: str, stage: str) -> Path:
    """`next_version_dir`, claimed by creating it (empty) so that a concurrent run picks the
    next number. `atomic_directory` replaces the empty claim; a claim never published (the
    stage failed) is removed by `atomic_directory` or at exit."""
    parent = version_parent(workdir, model_name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err.filename or parent, err) from err
    for _ in range(1000):
        out = next_version_dir(workdir, model_name, stage)
        try:
            out.mkdir()
        except FileExistsError:
            continue  # another run claimed it between the scan and the mkdir
        except OSError as err:
            raise write_error(out, err) from err
        with _CLAIMS_LOCK:
            _CLAIMS.add(out)
        return out
    raise OutputExistsError(f"could not claim a new version directory in {parent}")


def release_claim(final: Path, *, published: bool = False) -> None:
    """Forget the claim on `final`; unless it was published, remove it if still empty."""
    with _CLAIMS_LOCK:
        if final not in _CLAIMS:
            return
        _CLAIMS.discard(final)
    if not published:
        with contextlib.suppress(OSError):
            final.rmdir()  # only succeeds while empty


@atexit.register
def _release_all_claims() -> None:
    for claim in list(_CLAIMS):
        release_claim(claim)


def _is_within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output_dir(out: Path, *, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that is a file, non-empty (unless `overwrite`), or overlaps an input."""
    out_resolved = Path(out).expanduser().resolve()
    for given in inputs:
        inp = Path(given).expanduser().resolve()
        if _is_within(out_resolved, inp) or _is_within(inp, out_resolved):
            relation = (
                "is the input"
                if out_resolved == inp
                else "lies inside the input"
                if _is_within(out_resolved, inp)
                else "contains the input"
            )
            raise OutputExistsError(
                f"output {out} {relation} {given}",
                hint="pick another -o, or omit -o to write a new versioned directory",
            )
    if out_resolved.is_dir():
        if not overwrite and any(out_resolved.iterdir()):
            raise OutputExistsError(
                f"output directory {out} exists and is not empty",
                hint="pass --overwrite to replace it, pick another -o, "
                "or omit -o to write a new versioned directory",
            )
    elif out_resolved.exists():
        raise OutputExistsError(
            f"output {out} is a file, not a directory",
            hint="pick another -o, or omit -o to write a new versioned directory",
        )


def sha256_file(path: Path, cancel: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in chunks of up to 8 MiB (a smaller file in one read);
    raises `HashCancelled` once `cancel` is set."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        # a small file's own size: a fresh 8 MiB buffer costs more than hashing a vocab file
        buffer = memoryview(bytearray(min(_HASH_CHUNK, os.fstat(f.fileno()).st_size + 1)))
        while size := f.readinto(buffer):
            if cancel is not None and cancel.is_set():
                raise HashCancelled(f"hashing {path} was cancelled")
            digest.update(buffer[:size])
    return digest.hexdigest()


_HASH_CHUNK = 8 << 20


class HashCancelled(Exception):
    """A `sha256_file` stopped early because its `cancel` event was set."""


def checksum_files(
    directory: Path,
    exclude: Collection[str] = ("mposurgeon.json",),
    known: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """sha256 of every file under `directory`, keyed by relative POSIX path, sorted by path.

    `known` digests (e.g. of shards hashed as they were written) are taken as they are.
    """
    directory = Path(directory)
    known = known or {}
    sums: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in exclude:
            sums[rel] = known[rel] if rel in known else sha256_file(path)
    return dict(sorted(sums.items()))


def is_hub_blob_link(path: Path) -> bool:
    """True for a Hugging Face cache snapshot entry: `<repo>/snapshots/<rev>/...` linking to a
    regular file in `<repo>/blobs/`, the only symlinks an artifact may hold."""
    path = Path(os.path.abspath(path))
    if not path.is_symlink():
        return False
    snapshot = next((p for p in path.parents if p.parent.name == "snapshots"), None)
    if snapshot is None:
        return False
    blobs = snapshot.parent.parent / "blobs"
    target = path.resolve()
    return target.is_file() and target.parent == blobs.resolve()


def artifact_symlinks(directory: Path) -> list[str]:
    """Relative paths of the symlinks in `directory` (a hub cache snapshot's links to its
    blobs excepted), without following any."""
    directory = Path(directory)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            if path.is_symlink() and not is_hub_blob_link(path):
                found.append(path.relative_to(directory).as_posix())
    return sorted(found)


def listed_files(src: Path) -> set[str] | None:
    """The files the manifest of the artifact `src` lists, or None when `src` is no artifact."""
    path = Path(src) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, RecursionError, AttributeError) as err:
        raise ArtifactError(f"{path} cannot be read ({err})") from None
    return set(files) if isinstance(files, dict) else set()


def is_weight_file(name: str) -> bool:
    """True for a file name (or relative path) that holds weights or indexes their shards."""
    return name.endswith(WEIGHT_SUFFIXES)


def sentence_transformer_modules(directory: Path) -> list[str]:
    """The folders (relative POSIX paths) of the sentence-transformers modules that
    `directory/modules.json` names, apart from the Transformer itself (whose weights a stage
    replaces): e.g. `["1_Pooling", "2_Normalize"]`. A missing, unreadable or malformed
    modules.json names none; a path that is absolute, hidden or climbs out is left out."""
    path = Path(directory) / ST_MODULES_FILE
    try:
        if not path.is_file() or path.stat().st_size > _ST_MODULES_MAX_BYTES:
            return []
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    folders: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        if str(entry.get("type", "")).rsplit(".", 1)[-1] == "Transformer":
            continue
        rel = PurePosixPath(entry["path"])
        parts = rel.parts
        if not parts or rel.is_absolute() or any(p in ("..", ".") or p[0] == "." for p in parts):
            continue
        folders.append(rel.as_posix())
    return sorted(set(folders))


def _is_skipped_part(name: str) -> bool:
    """Hidden files and folders (.git, .cache, .gitattributes) and Python caches."""
    return name.startswith(".") or name == "__pycache__"


def _tree(src: Path, listed: set[str] | None) -> list[str]:
    """Relative POSIX paths of the regular files under `src`, hidden and cache ones left out,
    sorted. In a checkpoint a link to a folder is followed (each folder once); in an artifact
    (`listed`: its manifest's files) never, and one that holds a listed file is refused."""
    found: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[Path, str]] = [(src, "")]
    while stack:
        folder, prefix = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as entries:
                children = sorted(entries, key=lambda entry: entry.name)
        except OSError as err:
            raise ArtifactError(f"cannot read {folder}: {err.strerror or err}") from err
        for entry in children:
            if _is_skipped_part(entry.name):
                continue
            rel = prefix + entry.name
            try:
                is_link, is_dir = entry.is_symlink(), entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue  # vanished or unreadable metadata: nothing to copy
            if is_dir and is_link and listed is not None:
                if any(name.startswith(rel + "/") for name in listed):
                    raise ArtifactError(
                        f"{rel} in the artifact {src} is a symbolic link",
                        hint="an artifact holds regular files only: re-create it",
                    )
                continue
            if is_dir:
                stack.append((Path(entry.path), rel + "/"))
            elif is_file:
                found.append(rel)
    return sorted(found)


def _kept_files(files: list[str], modules: list[str]) -> list[str]:
    """Of a base's `files` (relative POSIX paths), those every output keeps: not a top-level
    weight, manifest, card or adapter config; a folder holding weights (an `onnx/` export, a
    Trainer `checkpoint-N/`) is another copy of the model and dropped whole, except the
    sentence-transformers module folders in `modules`, kept whole (a `2_Dense/` has weights
    of its own that no stage touches)."""

    def in_module(rel: str) -> bool:
        return any(rel.startswith(folder + "/") for folder in modules)

    stale: set[str] = set()  # folders that hold weights of the model in another form
    for rel in files:
        if is_weight_file(rel) and not in_module(rel):
            parents = PurePosixPath(rel).parents
            stale.update(p.as_posix() for p in parents if p != PurePosixPath("."))
    kept: list[str] = []
    for rel in files:
        path = PurePosixPath(rel)
        if in_module(rel):
            kept.append(rel)
        elif len(path.parts) == 1:
            if rel not in NOT_COPIED and not is_weight_file(rel):
                kept.append(rel)
        elif not any(p.as_posix() in stale for p in path.parents):
            kept.append(rel)
    return kept


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy every file of the base checkpoint or artifact `src` that an output keeps into
    `dst`, keeping its relative path; returns the relative POSIX paths copied.

    Kept: configs, tokenizer, generation config, license, sentence-transformers modules
    (`modules.json`, `1_Pooling/config.json`, ...) and any other file. Never copied: weights
    (see `WEIGHT_SUFFIXES`, `_kept_files`), the manifest and card (each stage writes its
    own), hidden files and folders, and files a stage already wrote into `dst` (e.g. a
    config with a new head). From an artifact only files its manifest lists are copied, and
    a symlink among them is refused; a Hugging Face cache snapshot's links to its blobs are
    copied as their content. Files are streamed, never read whole into memory.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return []  # a single weights file has no companions
    listed = listed_files(src)
    files = _tree(src, listed)
    if listed is not None:
        files = [rel for rel in files if rel in listed]  # an unlisted file is never trusted
    modules = sentence_transformer_modules(src) if ST_MODULES_FILE in files else []
    copied: list[str] = []
    for name in _kept_files(files, modules):
        source, target = src / name, dst / name
        if _taken(dst, name):
            continue
        if listed is not None and source.is_symlink() and not is_hub_blob_link(source):
            raise ArtifactError(
                f"{name} in the artifact {src} is a symbolic link",
                hint="an artifact holds regular files only: re-create it",
            )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(target.parent, err) from err
        try:
            shutil.copyfile(source, target)
        except OSError as err:
            if is_write_only_error(err) or err.filename == str(target):
                raise write_error(target, err) from err
            raise ArtifactError(f"cannot read {source}: {err.strerror or err}") from err
        copied.append(name)
    return copied


def _taken(dst: Path, name: str) -> bool:
    """True when `dst/name`, or a folder on its way, is already there as something else: a
    stage wrote it, so the base's copy is not wanted."""
    target = dst / name
    if target.exists() or target.is_symlink():
        return True
    parent = target.parent
    while parent != dst:
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            return True
        parent = parent.parent
    return False
