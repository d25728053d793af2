"""The lossless round trip on tiny random models of every supported architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.models.probe import model_output, sample_batch
from tests.conftest import ARCHITECTURES

LAYERS = ["FFN_1", "FFN_2", "attention", "embeddings"]


def _outputs(path: Path) -> torch.Tensor:
    config = AutoConfig.from_pretrained(path)
    with quiet_transformers():
        model = model_class(config).from_pretrained(path).eval()
    return model_output(model, sample_batch(config))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decompose_merge_round_trip(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir(arch)
    layers = [*LAYERS, "lm_head"] if arch == "llama" else LAYERS
    result = mposurgeon.decompose(source, output=tmp_path / "mpo", layers=layers, num_cores=3)
    manifest = read_manifest(tmp_path / "mpo")
    assert {m.target.group for m in result.modules} >= set(LAYERS)
    assert all(r.rel_error is not None and r.rel_error <= 1e-5 for r in manifest.modules.values())

    merged = mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "dense", verify=True)
    assert merged.comparison is not None and merged.comparison.ok

    expected, restored = _outputs(source), _outputs(tmp_path / "dense")
    assert (expected - restored).abs().max().item() <= 1e-4

    factorized = mposurgeon.load_model(tmp_path / "mpo")
    got = model_output(factorized, sample_batch(AutoConfig.from_pretrained(source)))
    assert (expected - got).abs().max().item() <= 1e-4


def test_gpt2_conv1d_is_stored_transposed_back(tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir("gpt2")
    mposurgeon.decompose(source, output=tmp_path / "mpo", layers=["FFN_1"], num_cores=3)
    rec = next(iter(read_manifest(tmp_path / "mpo").modules.values()))
    assert rec.kind == "conv1d"
    assert rec.shape == [rec.in_dim, rec.out_dim]  # Conv1D stores (in, out)


def test_tied_embedding_stays_tied_after_merge(tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir("gpt2")
    mposurgeon.decompose(source, output=tmp_path / "mpo", layers=["embeddings"], num_cores=3)
    rec = next(iter(read_manifest(tmp_path / "mpo").modules.values()))
    assert "lm_head.weight" in rec.tied_keys
    factorized = mposurgeon.load_model(tmp_path / "mpo")
    assert factorized.lm_head.mpo is factorized.transformer.wte.mpo
    mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "dense")
    config = AutoConfig.from_pretrained(tmp_path / "dense")
    with quiet_transformers():
        model = model_class(config).from_pretrained(tmp_path / "dense")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
