"""Acceptance on real weights: the shipped MiniLM (6-layer BERT) decomposed and merged back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest

SENTENCES = [
    "Tensor networks compress the weights of pretrained language models.",
    "A lossless decomposition must give back the very same hidden states.",
    "The cat sat on the mat.",
]


@pytest.fixture(scope="module")
def decomposed(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "decomposed"
    result = mposurgeon.decompose(minilm_dir, output=out, layers=["FFN_1", "FFN_2", "attention"])
    assert result.output == out
    return out


@pytest.fixture(scope="module")
def merged(decomposed: Path) -> Path:
    out = decomposed.parent / "merged"
    result = mposurgeon.merge(decomposed, output=out, verify=True)
    assert result.comparison is not None and result.comparison.ok
    return out


@pytest.fixture(scope="module")
def batch(minilm_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def _hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states of the real tokens (tokens, hidden): those of padding positions
    mean nothing and are ill-conditioned (a 1e-7 weight change moves them by 1e-4)."""
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


def test_decompose_makes_36_lossless_mpo_modules(decomposed: Path) -> None:
    manifest = read_manifest(decomposed)
    assert len(manifest.modules) == 36
    assert manifest.stage == "decompose" and manifest.format_version == 2
    for rec in manifest.modules.values():
        assert rec.rel_error is not None and rec.rel_error <= 1e-5, rec.name
        assert rec.bonds[0] == rec.bonds[-1] == 1
        assert rec.central_index == 2 and len(rec.out_modes) == 5
    kinds = {tuple(r.shape) for r in manifest.modules.values()}
    assert kinds == {(1536, 384), (384, 1536), (384, 384)}
    suffixes = {n.split(".", 3)[3] for n in manifest.modules}
    assert suffixes == {
        "intermediate.dense",
        "output.dense",
        "attention.output.dense",
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
    }


def test_artifact_layout_follows_the_format(decomposed: Path, minilm_dir: Path) -> None:
    names = {p.name for p in decomposed.iterdir()}
    assert {"mposurgeon.json", "model.safetensors", "config.json", "README.md"} <= names
    assert {"tokenizer.json", "vocab.txt"} <= names
    with safe_open(decomposed / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        core = f.get_slice("encoder.layer.0.intermediate.dense.mpo.core.2").get_shape()
    assert "encoder.layer.0.intermediate.dense.weight" not in keys
    assert "encoder.layer.0.intermediate.dense.bias" in keys
    assert "embeddings.word_embeddings.weight" in keys  # not a target: untouched
    rec = read_manifest(decomposed).modules["encoder.layer.0.intermediate.dense"]
    assert list(core) == [rec.bonds[2], rec.out_modes[2], rec.in_modes[2], rec.bonds[3]]
    manifest = json.loads((decomposed / "mposurgeon.json").read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json"}
    assert manifest["base"]["path"] == str(minilm_dir)


def test_merged_hidden_states_equal_the_original(
    merged: Path, minilm_dir: Path, batch: dict[str, torch.Tensor]
) -> None:
    original = AutoModel.from_pretrained(minilm_dir).eval()
    restored = AutoModel.from_pretrained(merged).eval()
    assert next(restored.parameters()).dtype == torch.float32
    diff = (_hidden(original, batch) - _hidden(restored, batch)).abs().max().item()
    assert diff <= 1e-4


def test_factorized_model_equals_original_in_both_forward_modes(
    decomposed: Path, minilm_dir: Path, batch: dict[str, torch.Tensor]
) -> None:
    reference = _hidden(AutoModel.from_pretrained(minilm_dir).eval(), batch)
    for mode in ("reconstruct", "contract"):
        model = mposurgeon.load_model(decomposed, forward_mode=mode)
        assert (_hidden(model, batch) - reference).abs().max().item() <= 1e-4


def test_merged_weights_match_original_tensors(merged: Path, minilm_dir: Path) -> None:
    with (
        safe_open(minilm_dir / "model.safetensors", "pt") as a,
        safe_open(merged / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            if x.is_floating_point():
                rel = ((x - y).norm() / x.norm().clamp_min(1e-30)).item()
                assert rel <= 1e-5, key


def test_inspect_json_schema(decomposed: Path) -> None:
    report = mposurgeon.inspect(decomposed)
    assert report["kind"] == "artifact" and report["format_version"] == 2
    assert report["stage"] == "decompose" and len(report["lineage"]) == 1
    mpo = [m for m in report["modules"] if m["kind"] == "mpo"]
    assert len(mpo) == 36
    assert {"name", "kind", "shape", "modes", "bonds", "params", "rel_error"} <= set(mpo[0])
    p = report["params"]
    assert p["total"] == p["mpo"] + p["dense"]
    assert p["mpo"] == sum(m["params"] for m in mpo)


def test_merged_lineage_has_both_stages(merged: Path) -> None:
    assert [e.stage for e in read_manifest(merged).lineage] == ["decompose", "merge"]
