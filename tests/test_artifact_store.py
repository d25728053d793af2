"""Atomic writes, versioned output paths, output checks, checksums (mposurgeon.artifact.store)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mposurgeon.artifact.store import (
    atomic_directory,
    check_output_dir,
    checksum_files,
    copy_model_files,
    next_version_dir,
    sha256_file,
)
from mposurgeon.errors import OutputExistsError


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_directory_success(tmp_path: Path) -> None:
    final = tmp_path / "deep" / "out"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent
        assert tmp.name.startswith(".out.tmp-")
        assert not final.exists()  # nothing visible until the end
        (tmp / "a.txt").write_text("hello")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("world")
    assert (final / "a.txt").read_text() == "hello"
    assert (final / "sub" / "b.txt").read_text() == "world"
    assert _siblings(final) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("stage failed"), KeyboardInterrupt()])
def test_atomic_directory_leaves_nothing_on_error(tmp_path: Path, error: BaseException) -> None:
    final = tmp_path / "out"
    with pytest.raises(type(error)), atomic_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise error
    assert _siblings(final) == []


def test_atomic_directory_error_never_touches_existing_output(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
    assert _siblings(final) == ["out"]


def test_atomic_directory_overwrite_replaces(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _siblings(final) == ["out"]  # the old copy moved aside is gone


def test_atomic_directory_refuses_non_empty_without_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError), atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
        final.mkdir()  # someone else wrote it meanwhile
        (final / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in final.iterdir()) == ["theirs.txt"]
    assert _siblings(final) == ["out"]


def test_atomic_directory_replaces_empty_dir(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("x")
    assert (final / "x").is_file()


def test_next_version_dir(tmp_path: Path) -> None:
    assert next_version_dir(tmp_path, "bert", "decompose") == tmp_path / "bert" / "v1-decompose"
    model = tmp_path / "bert"
    for name in ("v1-decompose", "v2-select", "v10-train", ".v11-merge.tmp-abcd", "v12x", "notes"):
        (model / name).mkdir(parents=True)
    (model / "v99-file").write_text("a file, not a version")
    assert next_version_dir(tmp_path, "bert", "merge") == model / "v11-merge"
    assert next_version_dir(tmp_path, "gpt2", "merge") == tmp_path / "gpt2" / "v1-merge"


def test_check_output_dir_accepts_new_and_empty(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    check_output_dir(tmp_path / "new", inputs=[src], overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", inputs=[src], overwrite=False)


def test_check_output_dir_refuses_non_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty") as info:
        check_output_dir(out, inputs=[], overwrite=False)
    assert "--overwrite" in (info.value.hint or "")
    assert (out / "precious.txt").read_text() == "keep me"
    check_output_dir(out, inputs=[], overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"  # checking never deletes


def test_check_output_dir_refuses_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_output_dir(out, inputs=[], overwrite=True)


@pytest.mark.parametrize(
    ("out_rel", "relation"),
    [("model", "is the input"), ("model/sub", "inside the input"), (".", "contains the input")],
)
def test_check_output_dir_refuses_overlap_with_input(
    tmp_path: Path, out_rel: str, relation: str
) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=relation):
        check_output_dir(tmp_path / out_rel, inputs=[src], overwrite=True)
    # a different spelling of the same directory is caught too
    with pytest.raises(OutputExistsError):
        check_output_dir(tmp_path / "model" / ".." / "model", inputs=[src], overwrite=True)


def test_checksums(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"bbb")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"\x00" * 3_000_000)
    (tmp_path / "mposurgeon.json").write_text("{}")
    assert sha256_file(tmp_path / "b.txt") == hashlib.sha256(b"bbb").hexdigest()
    sums = checksum_files(tmp_path)
    assert list(sums) == ["b.txt", "sub/a.bin"]
    assert sums["sub/a.bin"] == hashlib.sha256(b"\x00" * 3_000_000).hexdigest()
    assert "mposurgeon.json" in checksum_files(tmp_path, exclude=())


def test_copy_model_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors", "README.md"):
        (src / name).write_text(name)
    (tmp_path / "blob").write_text("linked config")
    (src / "generation_config.json").symlink_to(tmp_path / "blob")  # the hub cache's blobs
    copied = copy_model_files(src, dst)
    assert sorted(copied) == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "vocab.txt",
    ]
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    assert not (dst / "generation_config.json").is_symlink()
    assert (dst / "generation_config.json").read_text() == "linked config"


@pytest.mark.parametrize("size", [0, 1, 4095, (8 << 20) - 1, 8 << 20, (8 << 20) + 3, 20 << 20])
def test_sha256_file_is_hashlib_s_for_every_size(tmp_path: Path, size: int) -> None:
    """Files up to the 8 MiB chunk are read with a buffer of their size, larger ones in
    chunks: the digest is the same either way."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
