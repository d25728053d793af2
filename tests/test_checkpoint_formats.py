"""Checkpoint formats around decompose/merge: dtypes, shards, legacy pytorch_model.bin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, BertModel

import mposurgeon
from mposurgeon.models.probe import model_output, sample_batch


def _save(source: Path, out: Path, **kwargs) -> Path:
    model = BertModel.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "dtype"})
    model.save_pretrained(out, **{k: v for k, v in kwargs.items() if k != "dtype"})
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_preserves_half_dtypes(dtype, tiny_model_dir, tmp_path: Path) -> None:
    source = _save(tiny_model_dir("bert"), tmp_path / "half", dtype=dtype)
    mposurgeon.decompose(source, output=tmp_path / "mpo", layers=["FFN_1", "attention"])
    merged = mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "dense", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    with (
        safe_open(source / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "dense" / "model.safetensors", "pt") as b,
    ):
        for key in a.keys():
            assert b.get_slice(key).get_dtype() == a.get_slice(key).get_dtype(), key
    assert BertModel.from_pretrained(tmp_path / "dense").dtype == dtype


def test_float64_cores_and_float32_merge(tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir("bert")
    mposurgeon.decompose(source, output=tmp_path / "mpo", layers=["FFN_1"], dtype="float64")
    with safe_open(tmp_path / "mpo" / "model.safetensors", "pt") as f:
        assert f.get_slice("encoder.layer.0.intermediate.dense.mpo.core.0").get_dtype() == "F64"
    mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "dense")
    with safe_open(tmp_path / "dense" / "model.safetensors", "pt") as f:
        assert f.get_slice("encoder.layer.0.intermediate.dense.weight").get_dtype() == "F32"
    bf16 = mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "bf16", dtype="bfloat16",
                            verify=True)  # fmt: skip
    with safe_open(bf16.output / "model.safetensors", "pt") as f:
        assert f.get_slice("encoder.layer.0.intermediate.dense.weight").get_dtype() == "BF16"
    assert BertModel.from_pretrained(bf16.output).dtype == torch.bfloat16  # the config says so
    assert bf16.comparison is not None and bf16.comparison.ok


def test_sharded_input_and_sharded_output(tiny_model_dir, tmp_path: Path) -> None:
    source = _save(tiny_model_dir("bert"), tmp_path / "sharded", max_shard_size="50KB")
    assert (source / "model.safetensors.index.json").exists()
    mposurgeon.decompose(source, output=tmp_path / "mpo", max_shard_size="40KB")
    index = json.loads((tmp_path / "mpo" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "mpo" / s).exists() for s in shards)
    mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "dense", max_shard_size="40KB")
    assert (tmp_path / "dense" / "model.safetensors.index.json").exists()
    config = AutoConfig.from_pretrained(source)
    batch = sample_batch(config)
    expected = model_output(BertModel.from_pretrained(source).eval(), batch)
    got = model_output(BertModel.from_pretrained(tmp_path / "dense").eval(), batch)
    assert (expected - got).abs().max().item() <= 1e-4


def test_legacy_pytorch_model_bin_input(tiny_model_dir, tmp_path: Path) -> None:
    # transformers v5 no longer writes .bin files; write one as older versions did.
    source = tmp_path / "bin"
    source.mkdir()
    model = BertModel.from_pretrained(tiny_model_dir("bert"))
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    mposurgeon.decompose(source, output=tmp_path / "mpo", layers=["FFN_2"])
    merged = mposurgeon.merge(tmp_path / "mpo", output=tmp_path / "dense", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    assert (tmp_path / "dense" / "model.safetensors").exists()
