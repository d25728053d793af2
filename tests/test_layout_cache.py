"""The on-disk record cache, and the cached model layout that spares the modeling import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mposurgeon.models.layout as layout_module
from mposurgeon.artifact.cache import cache_dir, read_record, record_key, write_record
from mposurgeon.artifact.config import ARTIFACT_MARK
from mposurgeon.models.groups import select_targets
from mposurgeon.stages.common import model_layout
from mposurgeon.stages.decompose import decompose

TinyDir = Callable[[str], Path]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MPOSURGEON_CACHE", str(root))
    return root


def _records(root: Path) -> list[Path]:
    return sorted((root / "layouts").glob("*.json")) if (root / "layouts").is_dir() else []


def _refuse_meta_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("the layout should have come from the cache")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MPOSURGEON_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mposurgeon"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "mposurgeon"
    monkeypatch.setenv("MPOSURGEON_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MPOSURGEON_NO_CACHE", "1")
    assert cache_dir() is None
    assert write_record("x", "k", {"a": 1}) is False
    assert not (tmp_path / "mine").exists()


def test_record_round_trip_and_misses(cache: Path) -> None:
    assert read_record("ns", "k") is None
    assert write_record("ns", "k", {"a": [1, 2]}) is True
    assert read_record("ns", "k") == {"a": [1, 2]}
    assert list((cache / "ns").iterdir()) == [cache / "ns" / "k.json"]  # no temp file left
    (cache / "ns" / "k.json").write_text("{not json")
    assert read_record("ns", "k") is None
    (cache / "ns" / "k.json").write_text("[1, 2]")
    assert read_record("ns", "k") is None


def test_unwritable_cache_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MPOSURGEON_CACHE", str(blocker))
    assert write_record("ns", "k", {"a": 1}) is False
    assert read_record("ns", "k") is None


def test_record_key_separates_parts() -> None:
    assert record_key("ab", "c") != record_key("a", "bc")
    assert record_key("a", b"b") == record_key(b"a", "b")
    assert len(record_key("x")) == 64


def test_model_layout_is_built_once_then_read(
    cache: Path, tiny_model_dir: TinyDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model_dir("gpt2")
    built = model_layout(path)
    (record,) = _records(cache)
    monkeypatch.setattr(layout_module, "build_meta_model", _refuse_meta_model)
    assert model_layout(path) == built
    assert _records(cache) == [record]


def test_changed_config_is_a_new_key(cache: Path, tiny_model_dir: TinyDir, tmp_path: Path) -> None:
    import shutil

    original = tiny_model_dir("bert")
    copy = tmp_path / "bert-copy"
    shutil.copytree(original, copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    two_layers, one_layer = model_layout(original), model_layout(copy)
    assert len(_records(cache)) == 2
    assert len(one_layer.modules) < len(two_layers.modules)


def test_artifact_shares_its_base_checkpoints_layout(
    cache: Path, tiny_model_dir: TinyDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact's config.json differs from its base's by the artifact mark only: the layout
    the decompose cached serves the merge of its output (no modeling import there either),
    whichever spelling of the attention key the base used."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("bert"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"_attn_implementation": "eager"}))
    out = tmp_path / "dec"
    decompose(base, output=out, layers=["FFN_1"])
    assert ARTIFACT_MARK in (out / "config.json").read_text()
    (record,) = _records(cache)
    monkeypatch.setattr(layout_module, "build_meta_model", _refuse_meta_model)
    assert model_layout(out) == model_layout(base)
    assert _records(cache) == [record]
    config["num_hidden_layers"] = 1  # anything else in the config is another model
    (out / "config.json").write_text(json.dumps(config | {"attn_implementation": ARTIFACT_MARK}))
    with pytest.raises(AssertionError, match="from the cache"):
        model_layout(out)


def test_damaged_record_is_rebuilt(cache: Path, tiny_model_dir: TinyDir) -> None:
    path = tiny_model_dir("t5")
    built = model_layout(path)
    (record,) = _records(cache)
    data = json.loads(record.read_text())
    record.write_text(json.dumps(data | {"modules": "garbage"}))
    assert model_layout(path) == built
    assert json.loads(record.read_text()) == data


def test_cache_off_still_finds_targets(
    tiny_model_dir: TinyDir, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MPOSURGEON_CACHE", str(tmp_path / "unused"))
    monkeypatch.setenv("MPOSURGEON_NO_CACHE", "1")
    path = tiny_model_dir("llama")
    keys = {f"{m.name}.weight" for m in model_layout(path).modules}
    assert select_targets(model_layout(path), keys, layers=["FFN_1"])
    assert not (tmp_path / "unused").exists()


def test_decompose_plans_alike_cold_and_warm(cache: Path, tiny_model_dir: TinyDir) -> None:
    path = tiny_model_dir("bart")
    cold = decompose(path, layers=["FFN_1", "attention"], dry_run=True)
    assert _records(cache)
    warm = decompose(path, layers=["FFN_1", "attention"], dry_run=True)
    assert [(m.target, m.shape) for m in warm.modules] == [
        (m.target, m.shape) for m in cold.modules
    ]


def test_warm_decompose_process_skips_the_modeling_import(
    cache: Path, tiny_model_dir: TinyDir, tmp_path: Path
) -> None:
    """The point of the cache: a warm `decompose` never imports the transformers modeling stack
    (seconds of start-up), and writes the same artifact tensors as a cold one."""
    script = (
        "import sys, mposurgeon\n"
        "mposurgeon.decompose(sys.argv[1], output=sys.argv[2], layers=['FFN_1'])\n"
        "heavy = [m for m in ('transformers.modeling_utils', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    path = tiny_model_dir("bert")
    env = os.environ | {"MPOSURGEON_CACHE": str(cache)}

    def run(out: Path) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(path), str(out)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert "transformers.modeling_utils" in run(tmp_path / "cold")
    assert run(tmp_path / "warm") == "none"
    cold = json.loads((tmp_path / "cold" / "mposurgeon.json").read_text())
    warm = json.loads((tmp_path / "warm" / "mposurgeon.json").read_text())
    assert cold["files"]["model.safetensors"] == warm["files"]["model.safetensors"]
