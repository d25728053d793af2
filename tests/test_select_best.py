"""`train --select-best METRIC`: the artifact holds the weights of the best evaluation, the
manifest says which step, eval repeats that evaluation, and resume keeps the best so far."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.stages.train import TrainingInterrupted
from mposurgeon.training.loop import BestSelection
from tests.cli_runner import assert_one_line_error, run_cli, stop_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
#: A run whose eval loss does not fall all the way: a high learning rate overshoots.
COMMON: dict[str, Any] = dict(
    data=TRAIN,
    eval_data=EVAL,
    method="full",
    max_steps=8,
    batch_size=16,
    eval_every=1,
    lr=1e-1,
    seed=3,
)


@pytest.fixture(scope="module")
def runs(tiny_mpo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("best")
    last = mposurgeon.train(tiny_mpo, output=root / "last", **COMMON)
    best = mposurgeon.train(tiny_mpo, output=root / "best", select_best="loss", **COMMON)
    return {"last": last, "best": best, "root": root}


def test_the_weights_of_the_best_evaluation_are_kept(runs: dict[str, Any]) -> None:
    last, best = runs["last"], runs["best"]
    evals = best.metrics["eval"]
    assert evals == last.metrics["eval"]  # the same run: selection only picks the weights
    losses = [e["loss"] for e in evals]
    step = evals[losses.index(min(losses))]["step"]
    assert step != evals[-1]["step"], "the run must not end at its best for this test"
    assert best.metrics["best_step"] == step and best.metrics["best_metric"] == "loss"
    assert best.metrics["eval_loss"] == min(losses)
    assert last.metrics["best_step"] is None and last.metrics["eval_loss"] == losses[-1]
    manifest = read_manifest(best.output)
    assert manifest.metrics is not None and manifest.metrics["best_step"] == step
    # eval of the artifact repeats the evaluation of the kept step, not the last one
    again = mposurgeon.evaluate(best.output, data=EVAL, batch_size=16).metrics
    kept = evals[losses.index(min(losses))]
    assert again["accuracy"] == kept["accuracy"]
    assert again["loss"] == pytest.approx(kept["loss"], abs=1e-6)


def test_weights_that_do_not_train_are_as_loaded(runs: dict[str, Any]) -> None:
    """Only trainable parameters are copied back; with `full` all of them train, so the two
    artifacts differ in every trained tensor and agree in the frozen buffers."""
    a = load_file(runs["last"].output / "model.safetensors")
    b = load_file(runs["best"].output / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_best_of_before_the_interruption(
    tiny_mpo: Path, runs: dict[str, Any], tmp_path: Path
) -> None:
    options = dict(COMMON, select_best="loss", save_every=2)
    workdir = tmp_path / "wd"
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(tiny_mpo, workdir=workdir, progress=stop_at_step(7), **options)
    resumed = mposurgeon.train(tiny_mpo, workdir=workdir, resume=True, **options)
    assert resumed.metrics["best_step"] == runs["best"].metrics["best_step"]
    a = load_file(runs["best"].output / "model.safetensors")
    b = load_file(resumed.output / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_better_never_takes_nan_and_keeps_the_earlier_of_a_tie() -> None:
    low, high = BestSelection("loss", maximize=False), BestSelection("accuracy", maximize=True)
    assert low.better(1.0, None) and low.better(0.5, 1.0) and not low.better(1.0, 1.0)
    assert high.better(0.9, 0.8) and not high.better(0.8, 0.8) and not high.better(0.7, 0.8)
    assert not low.better(float("nan"), None) and not high.better(float("nan"), 0.1)


def test_cli_shows_the_step_kept_and_refuses_bad_metrics(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    base = ("train", tiny_mpo, "--data", TRAIN, "--method", "full", "--max-steps", "2", "-o", out)
    cases = [
        (("--eval-data", EVAL, "--select-best", "pearson"), "classification evaluations report"),
        (("--select-best", "accuracy"), "there is no eval data"),
    ]
    for extra, needle in cases:
        assert_one_line_error(run_cli(capsys, *base, *extra), 2, needle)
        assert not out.exists()
    args = ("--eval-data", EVAL, "--eval-every", "1", "--select-best", "accuracy", "-q")
    result = run_cli(capsys, *base, *args)
    assert result.code == 0, result
    assert "kept the weights of step" in result.out and "(best accuracy of 2 evaluations)" in (
        result.out
    )
