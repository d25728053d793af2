"""Every output keeps what the base checkpoint had beside its weights (issue 16, item 3):
sentence-transformers modules, license, nested and unknown files; never other weights, hidden
files, or files dropped into an artifact by hand."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.artifact.resolve import resolve_model
from mposurgeon.artifact.store import (
    checksum_files,
    copy_model_files,
    sentence_transformer_modules,
    sha256_file,
)
from mposurgeon.errors import ArtifactError

SENTENCES = [
    "Tensor networks compress the weights of pretrained language models.",
    "A lossless decomposition must give back the very same embeddings.",
    "The cat sat on the mat.",
]

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
]

#: Files of the tiny base that every output keeps, with their bytes.
KEPT: dict[str, bytes] = {
    "LICENSE": b"Apache License 2.0 (test copy)\n",
    "extra/notes/info.txt": b"nested two folders deep\n",
    "weird.dat": bytes(range(256)) * 3,
    "modules.json": json.dumps(MODULES).encode(),
    "1_Pooling/config.json": b'{"word_embedding_dimension": 32}\n',
    "2_Dense/config.json": b'{"in_features": 32, "out_features": 8}\n',
}

#: Files of the tiny base that no output keeps: weights in other formats, a folder holding
#: a copy of the model in another form, hidden files and folders, the base's card.
DROPPED: dict[str, bytes] = {
    "tf_model.h5": b"not really hdf5",
    "rust_model.ot": b"not really torch script",
    "pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "onnx/model.onnx": b"not really onnx",
    "onnx/config.json": b"{}",
    "checkpoint-5/optimizer.pt": b"not really a pickle",
    "checkpoint-5/trainer_state.json": b"{}",
    ".gitattributes": b"*.bin filter=lfs\n",
    ".cache/huggingface/download/x.lock": b"",
    "extra/.hidden": b"secret",
}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.fixture(scope="module")
def tiny_base(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny BERT with a license, nested, unknown, sentence-transformers module files (a
    Dense module with weights of its own), and files no output may keep."""
    base = tmp_path_factory.mktemp("keep") / "base"
    shutil.copytree(tiny_model_dir("bert"), base)
    _write(base, KEPT | DROPPED)
    (base / "README.md").write_text("# the base's own card\n")
    save_file({"linear.weight": torch.ones(8, 32)}, base / "2_Dense" / "model.safetensors")
    return base


@pytest.fixture(scope="module")
def tiny_decomposed(tiny_base: Path) -> Path:
    out = tiny_base.parent / "decomposed"
    mposurgeon.decompose(tiny_base, output=out, layers=["FFN_1"])
    return out


@pytest.fixture(scope="module")
def tiny_merged(tiny_decomposed: Path) -> Path:
    out = tiny_decomposed.parent / "merged"
    mposurgeon.merge(tiny_decomposed, output=out, verify=True)
    return out


def _assert_keeps_base_files(out: Path, base: Path) -> None:
    listed = read_manifest(out).files
    for rel in [*KEPT, "2_Dense/model.safetensors"]:
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
        assert listed[rel] == sha256_file(base / rel), rel
    for rel in DROPPED:
        assert not (out / rel).exists(), rel
        assert rel not in listed
    for folder in ("onnx", "checkpoint-5", ".cache"):
        assert not (out / folder).exists(), folder
    assert (out / "README.md").read_text() != (base / "README.md").read_text()


def test_decompose_keeps_every_base_file_but_weights(
    tiny_decomposed: Path, tiny_base: Path
) -> None:
    _assert_keeps_base_files(tiny_decomposed, tiny_base)


def test_merge_keeps_every_base_file_but_weights(tiny_merged: Path, tiny_base: Path) -> None:
    _assert_keeps_base_files(tiny_merged, tiny_base)
    dense = {"model.safetensors", "2_Dense/model.safetensors"}
    assert {r for r in read_manifest(tiny_merged).files if r.endswith(".safetensors")} == dense


def test_a_changed_nested_file_fails_the_checksum_check(
    tiny_decomposed: Path, tmp_path: Path
) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_decomposed, art)
    (art / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 64}\n')
    with pytest.raises(ArtifactError, match="1_Pooling/config.json does not match its checksum"):
        mposurgeon.merge(art, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_nested_file_is_reported(tiny_decomposed: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_decomposed, art)
    (art / "extra" / "notes" / "info.txt").unlink()
    with pytest.raises(ArtifactError, match="extra/notes/info.txt is listed .* but missing"):
        mposurgeon.merge(art, output=tmp_path / "out")


def test_files_dropped_into_an_artifact_by_hand_are_not_copied_on(
    tiny_decomposed: Path, tmp_path: Path
) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_decomposed, art)
    planted = {
        "planted.txt": b"not listed",
        "extra/planted.txt": b"not listed",
        "1_Pooling/planted.json": b"{}",
        "3_New/config.json": b"{}",
    }
    _write(art, planted)
    out = tmp_path / "out"
    mposurgeon.merge(art, output=out)
    for rel in planted:
        assert not (out / rel).exists(), rel
    assert not (out / "3_New").exists()
    assert (out / "extra" / "notes" / "info.txt").read_bytes() == KEPT["extra/notes/info.txt"]


def test_a_linked_folder_in_an_artifact_is_refused(tiny_decomposed: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_decomposed, art)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(art / "extra" / "notes", elsewhere)
    (art / "extra" / "notes").symlink_to(elsewhere, target_is_directory=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(ArtifactError, match="extra/notes in the artifact .* symbolic link"):
        copy_model_files(art, dst)


def test_a_linked_folder_in_a_checkpoint_is_followed_once(tmp_path: Path) -> None:
    src, real, dst = tmp_path / "src", tmp_path / "real", tmp_path / "dst"
    _write(src, {"config.json": b"{}"})
    _write(real, {"a.txt": b"a", "deep/b.txt": b"b"})
    (src / "linked").symlink_to(real, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # must not recurse forever
    dst.mkdir()
    assert copy_model_files(src, dst) == ["config.json", "linked/a.txt", "linked/deep/b.txt"]
    assert (dst / "linked" / "deep" / "b.txt").read_bytes() == b"b"
    assert not (dst / "linked").is_symlink()


def test_files_a_stage_wrote_are_never_overwritten(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write(src, {"config.json": b"base", "sub/x.txt": b"base", "blocked/y.txt": b"base"})
    _write(dst, {"config.json": b"stage", "sub/x.txt": b"stage", "blocked": b"a file"})
    assert copy_model_files(src, dst) == []
    assert (dst / "config.json").read_bytes() == b"stage"
    assert (dst / "sub" / "x.txt").read_bytes() == b"stage"


def test_a_large_file_is_copied_and_hashed_without_reading_it_whole(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    size = 101 * 1024 * 1024  # over 100 MB
    with open(src / "big.dat", "wb") as f:  # sparse: nothing is written but the last byte
        f.seek(size - 1)
        f.write(b"\x01")
    tracemalloc.start()
    try:
        assert copy_model_files(src, dst) == ["big.dat"]
        sums = checksum_files(dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(dst / "big.dat") == size
    assert sums["big.dat"] == sha256_file(src / "big.dat")
    assert peak < 32 * 1024 * 1024  # one 8 MiB hashing buffer, never the 101 MB file


def test_sentence_transformer_modules_reads_only_safe_folders(tmp_path: Path) -> None:
    entries = [
        *MODULES,
        {"path": "../outside", "type": "x.Dense"},
        {"path": "/abs", "type": "x.Dense"},
        {"path": ".hidden", "type": "x.Dense"},
        {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"name": "no path"},
        "not an object",
    ]
    (tmp_path / "modules.json").write_text(json.dumps(entries))
    assert sentence_transformer_modules(tmp_path) == ["1_Pooling", "2_Dense"]
    (tmp_path / "modules.json").write_text("{not json")
    assert sentence_transformer_modules(tmp_path) == []
    (tmp_path / "modules.json").write_text('{"path": "1_Pooling"}')
    assert sentence_transformer_modules(tmp_path) == []


# -- hub downloads -----------------------------------------------------------------------------

#: A sentence-transformers repository as the hub lists it (all-MiniLM-L6-v2's files, plus a
#: license and a Dense module).
HUB_REPO: dict[str, bytes] = {
    ".gitattributes": b"",
    "1_Pooling/config.json": b"{}",
    "2_Dense/config.json": b"{}",
    "2_Dense/model.safetensors": b"dense",
    "2_Dense/model.onnx": b"onnx",
    "LICENSE": b"license",
    "README.md": b"card",
    "config.json": b'{"model_type": "bert"}',
    "config_sentence_transformers.json": b"{}",
    "data_config.json": b"[]",
    "model.safetensors": b"weights",
    "modules.json": json.dumps(MODULES).encode(),
    "onnx/model.onnx": b"onnx",
    "onnx/config.json": b"{}",
    "openvino/openvino_model.bin": b"ov",
    "openvino/openvino_model.xml": b"<xml/>",
    "pytorch_model.bin": b"legacy",
    "rust_model.ot": b"rust",
    "sentence_bert_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "tf_model.h5": b"tf",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "train_script.py": b"print()",
    "vocab.txt": b"[PAD]",
}


def _fake_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repo: dict[str, bytes]
) -> list[dict[str, object]]:
    """Replace `snapshot_download` by one that fetches from `repo` what the patterns select,
    as the hub client does; returns the calls."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    snapshot = tmp_path / "snapshot"
    calls: list[dict[str, object]] = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(kwargs)
        chosen = filter_repo_objects(
            repo,
            allow_patterns=kwargs.get("allow_patterns"),  # type: ignore[arg-type]
            ignore_patterns=kwargs.get("ignore_patterns"),  # type: ignore[arg-type]
        )
        _write(snapshot, {rel: repo[rel] for rel in chosen})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _fetched(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_hub_download_fetches_modules_and_license_but_no_other_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_hub(monkeypatch, tmp_path, HUB_REPO)
    resolved = resolve_model("org/st-model", offline=False)
    assert resolved.kind == "hf"
    assert _fetched(resolved.path) == {
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "LICENSE",
        "README.md",
        "config.json",
        "config_sentence_transformers.json",
        "data_config.json",
        "model.safetensors",
        "modules.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_script.py",
        "vocab.txt",
    }
    assert len(calls) == 2  # the repository's top level, then its module folders


def test_hub_download_without_safetensors_fetches_legacy_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo = {k: v for k, v in HUB_REPO.items() if not k.endswith(".safetensors")}
    repo["pytorch_model.bin.index.json"] = b"{}"
    _fake_hub(monkeypatch, tmp_path, repo)
    fetched = _fetched(resolve_model("org/st-model", offline=False).path)
    assert {"pytorch_model.bin", "pytorch_model.bin.index.json", "LICENSE"} <= fetched
    assert not fetched & {"tf_model.h5", "rust_model.ot", "onnx/model.onnx", "2_Dense/model.onnx"}


def test_hub_artifact_fetches_every_listed_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    listed = {"config.json": "0", "extra/notes/info.txt": "1", "weird.dat": "2"}
    repo = {
        "mposurgeon.json": json.dumps({"files": listed}).encode(),
        "config.json": b"{}",
        "extra/notes/info.txt": b"nested",
        "weird.dat": b"unknown",
        "unlisted/x.txt": b"not listed",
        "model.safetensors": b"weights",
    }
    _fake_hub(monkeypatch, tmp_path, repo)
    resolved = resolve_model("org/an-artifact", offline=False)
    assert resolved.kind == "artifact"
    assert {"extra/notes/info.txt", "weird.dat"} <= _fetched(resolved.path)
    assert "unlisted/x.txt" not in _fetched(resolved.path)


# -- the shipped MiniLM as sentence-transformers loads it ----------------------------------------


@pytest.fixture(scope="module")
def minilm_merged(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("minilm-keep")
    mposurgeon.decompose(minilm_dir, output=root / "dec", layers=["FFN_1"])
    mposurgeon.merge(root / "dec", output=root / "merged", verify=True)
    return root / "merged"


def test_merged_minilm_keeps_its_sentence_transformers_files(
    minilm_merged: Path, minilm_dir: Path
) -> None:
    listed = read_manifest(minilm_merged).files
    for rel in (
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "data_config.json",
        "1_Pooling/config.json",
    ):
        assert (minilm_merged / rel).read_bytes() == (minilm_dir / rel).read_bytes(), rel
        assert rel in listed
    assert not (minilm_merged / ".gitattributes").exists()


def test_merged_minilm_gives_the_original_normalized_embeddings(
    minilm_merged: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    original = SentenceTransformer(str(minilm_dir), device="cpu")
    merged = SentenceTransformer(str(minilm_merged), device="cpu")
    expected = original.encode(SENTENCES, convert_to_tensor=True)
    got = merged.encode(SENTENCES, convert_to_tensor=True)
    assert got.shape == expected.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
