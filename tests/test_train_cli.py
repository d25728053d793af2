"""`mposurgeon train` from the command line: bad inputs, warnings, --json, inspect, and one
short lightweight run on the real MiniLM."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mposurgeon.artifact.manifest import read_manifest
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


# -- bad inputs: one line, exit code, nothing written ----------------------------------------


def test_lightweight_needs_mpo_modules(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    base = tiny_classifier_dir("bert")
    result = run_cli(capsys, "train", base, "-o", out, "--mode", "lightweight", "--data", TRAIN)
    assert_one_line_error(result, 2, "--method lightweight", "has none", "hint: decompose it first")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_overparam_needs_mpo_modules_a_selection_or_dynamic(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_classifier_dir("bert")
    result = run_cli(
        capsys, "train", base, "-o", tmp_path / "o", "--mode", "overparam", "--data", TRAIN
    )
    assert_one_line_error(result, 2, "no MPO modules and no selection", "--dynamic")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--dynamic", "--split-num", "2", "--top-n", "3"), "divisible by --split-num"),
        (("--dynamic", "--split-num", "2"), "divisible by --split-num"),
        (("--split-num", "2", "--top-n", "2"), "need --dynamic"),
        (("--dynamic", "--top-n", "2", "--weight-types", "embeddings"), "--weight-types"),
    ],
)
def test_dynamic_needs_a_top_n_that_split_num_divides(
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    needle: str,
) -> None:
    out = tmp_path / "o"
    base = tiny_classifier_dir("bert")
    result = run_cli(
        capsys, "train", base, "-o", out, "--mode", "overparam", "--data", TRAIN, *flags
    )
    assert_one_line_error(result, 2, needle)
    assert not out.exists()


def test_bad_data_names_the_line(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good", "label": "a"}\n{"text": "no label"}\n', encoding="utf-8")
    out = tmp_path / "o"
    result = run_cli(capsys, "train", tiny_mpo, "-o", out, "--mode", "lightweight", "--data", data)
    assert_one_line_error(result, 1, "d.jsonl line 2", "missing 'label'")
    data.write_text('{"text": "good", "label": "a"}\n{"text": oops}\n', encoding="utf-8")
    result = run_cli(capsys, "train", tiny_mpo, "-o", out, "--mode", "lightweight", "--data", data)
    assert_one_line_error(result, 1, "d.jsonl line 2", "invalid JSON")
    result = run_cli(
        capsys, "train", tiny_mpo, "-o", out, "--mode", "lightweight", "--data", TRAIN,
        "--eval-data", data,
    )  # fmt: skip
    assert_one_line_error(result, 1, "d.jsonl line 2")
    result = run_cli(capsys, "train", tiny_mpo, "-o", out, "--mode", "sideways", "--data", TRAIN)
    assert_one_line_error(result, 2, "--mode")
    assert not out.exists()


def test_batch_larger_than_the_data_is_a_warning(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(TRAIN.read_text(encoding="utf-8").splitlines()[:6]) + "\n")
    out = tmp_path / "o"
    result = run_cli(
        capsys, "train", tiny_mpo, "-o", out, "--mode", "lightweight", "--data", data,
        "--batch-size", "64", "--epochs", "2", "--json",
    )  # fmt: skip
    assert result.code == 0, result
    assert "warning: --batch-size 64 is larger than the training data (6 rows)" in result.err
    report = json.loads(result.out)
    assert report["metrics"]["steps"] == 2 and report["warnings"]
    assert read_manifest(out).stage == "train"


# -- a real run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_mpo(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mposurgeon

    out = tmp_path_factory.mktemp("minilm-train") / "dec"
    mposurgeon.decompose(minilm_dir, output=out, layers=["FFN_1", "FFN_2", "attention"])
    return out


def test_minilm_lightweight_short_run(
    minilm_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(2)  # a real model: both cores
    out = tmp_path / "light"
    result = run_cli(
        capsys, "train", minilm_mpo, "-o", out, "--mode", "lightweight", "--data", TRAIN,
        "--eval-data", EVAL, "--max-steps", "3", "--batch-size", "8", "--max-length", "32",
        "--lr", "1e-3", "--json", "-q",
    )  # fmt: skip
    torch.set_num_threads(1)
    assert result.code == 0, result
    metrics = json.loads(result.out)["metrics"]
    assert metrics["method"] == "lightweight" and metrics["steps"] == 3
    assert 0 < metrics["trainable_fraction"] < 0.25  # BERT shapes: central cores dominate
    assert metrics["eval"][-1]["step"] == 3 and 0 <= metrics["eval_accuracy"] <= 1
    manifest = read_manifest(out)
    assert len(manifest.modules) == 36 and manifest.metrics == metrics
    assert all(name.startswith("bert.encoder.") for name in manifest.modules)
    assert {tuple(r.trainable) for r in manifest.modules.values()} == {(0, 1, 3, 4)}

    shown = run_cli(capsys, "inspect", out)
    assert shown.code == 0, shown
    assert "trained 3 steps" in shown.out and "eval (classification): accuracy" in shown.out
    assert "trainable parameters:" in shown.out
    as_json = json.loads(run_cli(capsys, "inspect", out, "--json").out)
    assert as_json["metrics"] == metrics
    assert as_json["params"]["trainable"] == metrics["trainable_params"]


@pytest.mark.parametrize("method", ["full", "lightweight", "overparam"])
def test_each_method_trains_at_its_measured_default_lr(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    """Without --lr, a method trains at its config's default (benchmarks/bench_defaults.py):
    the lightweight cores need far larger steps than dense fine-tuning (2e-5 left them
    untrained)."""
    from mposurgeon.methods.registry import method_config

    default = method_config(method).default("lr")
    out = tmp_path / "out"
    flags = ("--method", method, "--data", TRAIN, "--max-steps", "1", "--json")
    result = run_cli(capsys, "train", tiny_mpo, "-o", out, *flags)
    assert result.code == 0, result
    metrics = json.loads(result.out)["metrics"]
    assert metrics["lr"] == default and metrics["method_options"]["lr"] == default
    assert read_manifest(out).options["lr"] == default
    assert method_config("lightweight").default("lr") > method_config("full").default("lr")
