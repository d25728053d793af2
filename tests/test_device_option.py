"""`--device` of the streaming stages: auto is the CPU without CUDA (results unchanged), cuda
without a GPU is a one-line usage error that writes nothing. The CUDA path itself runs only
where torch sees a GPU (skipped here otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mposurgeon
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import UsageError
from mposurgeon.models.device import compute_device
from tests.cli_runner import assert_one_line_error, run_cli

CUDA = torch.cuda.is_available()


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    with open_tensors(artifact) as reader:
        return {key: reader.get(key).clone() for key in reader.keys()}


@pytest.fixture(scope="module")
def dec(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device") / "dec"
    mposurgeon.decompose(tiny_model_dir("llama"), output=out)
    return out


def test_auto_is_a_gpu_only_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compute_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        compute_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device("auto") == torch.device("cuda")
    assert compute_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("stage", ["decompose", "truncate", "merge"])
def test_cuda_without_a_gpu_is_a_usage_error(
    stage: str, dec: Path, tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_model_dir("llama") if stage == "decompose" else dec
    extra = ["--param-ratio", "0.5"] if stage == "truncate" else []
    out = tmp_path / "never"
    result = run_cli(capsys, stage, source, "-o", out, "--device", "cuda", *extra)
    assert_one_line_error(result, 2, "--device cuda", "no CUDA device")
    assert not out.exists()


def test_an_unknown_device_is_a_usage_error(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    result = run_cli(capsys, "decompose", tiny_model_dir("llama"), "-o", out, "--device", "gpu")
    assert_one_line_error(result, 2, "--device")
    assert not out.exists()


def test_cpu_gives_what_auto_gives_without_cuda(
    dec: Path, tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mposurgeon.decompose(tiny_model_dir("llama"), output=tmp_path / "d", device="cpu")
    mposurgeon.truncate(dec, output=tmp_path / "t-cpu", param_ratio=0.5, device="cpu")
    mposurgeon.truncate(dec, output=tmp_path / "t-auto", param_ratio=0.5)
    for a, b in ((dec, tmp_path / "d"), (tmp_path / "t-auto", tmp_path / "t-cpu")):
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_results_match_the_cpus(dec: Path, tiny_model_dir, tmp_path: Path) -> None:
    """On a GPU: the same bonds and errors within float32 round-off, outputs on disk as on the
    CPU (cores in the same dtypes), merge within 1e-5 of the CPU's."""
    mposurgeon.decompose(tiny_model_dir("llama"), output=tmp_path / "d", device="cuda")
    a = mposurgeon.truncate(dec, output=tmp_path / "t-cpu", param_ratio=0.5, device="cpu")
    b = mposurgeon.truncate(dec, output=tmp_path / "t-gpu", param_ratio=0.5, device="cuda")
    assert [m.bonds for m in a.modules] == [m.bonds for m in b.modules]
    for x, y in zip(a.modules, b.modules, strict=True):
        assert y.rel_error == pytest.approx(x.rel_error, rel=1e-4, abs=1e-6)
    mposurgeon.merge(dec, output=tmp_path / "m-cpu", device="cpu")
    mposurgeon.merge(dec, output=tmp_path / "m-gpu", device="cuda")
    ta, tb = _tensors(tmp_path / "m-cpu"), _tensors(tmp_path / "m-gpu")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype
        assert torch.allclose(ta[key].double(), tb[key].double(), rtol=1e-5, atol=1e-6), key
