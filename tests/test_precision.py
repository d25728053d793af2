"""`train --precision bf16` (mixed precision on the CPU), `--gradient-checkpointing`, and the
device and precision requests this machine cannot serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.errors import UsageError
from mposurgeon.models.layers import MPOLinear
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
COMMON: dict[str, Any] = dict(
    data=TRAIN, eval_data=EVAL, method="lightweight", max_steps=3, batch_size=16, seed=2
)


def _output_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Record the output dtype of every MPO layer call during training."""
    seen: list[torch.dtype] = []
    real = MPOLinear.forward

    def forward(self: MPOLinear, x: torch.Tensor) -> torch.Tensor:
        out = real(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(MPOLinear, "forward", forward)
    return seen


def test_bf16_trains_under_autocast_and_writes_float32_weights(
    tiny_mpo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _output_dtypes(monkeypatch)
    result = mposurgeon.train(tiny_mpo, output=tmp_path / "bf16", precision="bf16", **COMMON)
    assert seen and set(seen) == {torch.bfloat16}
    assert result.metrics["precision"] == "bf16"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # this machine: emulated bf16
        assert any("no native bf16 kernels" in w for w in result.warnings), result.warnings
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}
    seen.clear()
    plain = mposurgeon.train(tiny_mpo, output=tmp_path / "fp32", **COMMON)
    assert set(seen) == {torch.float32}
    # autocast changed the numbers a little, not the outcome
    assert plain.metrics["final_loss"] != result.metrics["final_loss"]
    assert result.metrics["final_loss"] == pytest.approx(plain.metrics["final_loss"], abs=0.05)


def test_gradient_checkpointing_recomputes_and_trains_the_same_weights(
    tiny_mpo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer runs twice per training step (forward, then again in backward), and the
    weights equal those of a run without checkpointing (dropout draws the same numbers)."""
    seen = _output_dtypes(monkeypatch)
    mposurgeon.train(tiny_mpo, output=tmp_path / "plain", **COMMON)
    calls = len(seen)
    seen.clear()
    result = mposurgeon.train(
        tiny_mpo, output=tmp_path / "gc", gradient_checkpointing=True, **COMMON
    )
    assert len(seen) == 2 * calls and result.metrics["gradient_checkpointing"] is True
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "gc" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_requests_this_machine_cannot_serve_are_refused(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    base = ("train", tiny_mpo, "--data", TRAIN, "--method", "full", "--max-steps", "1", "-o", out)
    cases = [
        (("--precision", "fp8"), "--precision"),
        (("--device", "tpu"), "--device"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (("--device", "cuda"), "--device cuda: torch sees no CUDA device here"),
            (("--precision", "fp16"), "--precision fp16 needs a GPU"),
        ]
    for extra, needle in cases:
        assert_one_line_error(run_cli(capsys, *base, *extra), 2, needle)
        assert not out.exists() and not Path(f"{out}.partial").exists()


def test_device_cpu_is_honoured_and_eval_takes_the_same_flags(
    tiny_mpo: Path, tmp_path: Path
) -> None:
    result = mposurgeon.train(tiny_mpo, output=tmp_path / "cpu", device="cpu", **COMMON)
    assert result.metrics["steps"] == 3
    scores = mposurgeon.evaluate(result.output, data=EVAL, device="cpu", precision="bf16")
    assert scores.metrics["accuracy"] == pytest.approx(result.metrics["eval_accuracy"], abs=0.05)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="fp16 needs a GPU"):
            mposurgeon.evaluate(result.output, data=EVAL, precision="fp16")
