"""Where artifacts go on disk: atomic directory writes, versioned paths, checksums, file copies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

from mposurgeon.errors import OutputExistsError

#: Files copied from a base checkpoint into every artifact (never weights).
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

_VERSION_RE = re.compile(r"^v(\d+)-")


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


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final`; on success fsync it and rename it to `final`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `final`
    is left untouched. An existing empty `final` is replaced; a non-empty one only with
    `overwrite=True` (the old directory is moved aside, the new one renamed in, the old deleted).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, final, overwrite=overwrite)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(final.parent, directory=True)


def _move_into_place(tmp: Path, final: Path, *, overwrite: bool) -> None:
    old: Path | None = None
    if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        final.rmdir()
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


def next_version_dir(workdir: Path, model_name: str, stage: str) -> Path:
    """`<workdir>/<model_name>/v<N>-<stage>`, N one more than the highest `v<K>-*` there."""
    parent = Path(workdir) / model_name
    highest = 0
    if parent.is_dir():
        for child in parent.iterdir():
            match = _VERSION_RE.match(child.name)
            if match and child.is_dir():
                highest = max(highest, int(match.group(1)))
    return parent / f"v{highest + 1}-{stage}"


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
    """Hex sha256 of a file, read in 8 MiB chunks; raises `HashCancelled` once `cancel` is set."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
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


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy the config and tokenizer files that exist in `src` to `dst` (never weights),
    except those a stage already wrote into `dst` (e.g. a config with a new head)."""
    copied: list[str] = []
    for name in MODEL_FILES:
        source = Path(src) / name
        # hub cache entries are symlinks to blobs: copyfile copies the content
        if source.is_file() and not (Path(dst) / name).exists():
            shutil.copyfile(source, Path(dst) / name)
            copied.append(name)
    return copied
