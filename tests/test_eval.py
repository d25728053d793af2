"""`eval` (mposurgeon.evaluate): the scores of a trained classifier, by the code path of train's
evaluations, for an artifact (factorized), its merged output and a plain checkpoint; in
recipes; and its refusals (one line, exit code)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mposurgeon
from mposurgeon.artifact.manifest import MANIFEST_NAME, read_manifest
from mposurgeon.cli.render import eval_line
from mposurgeon.cli.train import metrics_lines
from mposurgeon.stages.merge import TOLERANCES
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
V1_TRAIN = Path(__file__).resolve().parent / "data" / "v1" / "train"
SCORES = ("accuracy", "macro_f1", "mcc")


@pytest.fixture(scope="module")
def trained(tiny_mpo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MPO classifier trained (all weights, cores included) far enough to score
    between chance and perfect, evaluated at the end on the shipped eval data."""
    out = tmp_path_factory.mktemp("eval") / "train"
    mposurgeon.train(
        tiny_mpo, method="full", data=str(TRAIN), eval_data=str(EVAL), max_steps=75, batch_size=8,
        lr=3e-3, output=out,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def merged(trained: Path) -> Path:
    out = trained.parent / "merged"
    mposurgeon.merge(trained, output=out, verify=True)
    return out


@pytest.fixture(scope="module")
def plain(merged: Path) -> Path:
    """The merged classifier as a plain Hugging Face checkpoint (no manifest)."""
    out = merged.parent / "plain"
    out.mkdir()
    for item in merged.iterdir():
        if item.name != MANIFEST_NAME:
            shutil.copyfile(item, out / item.name)
    return out


def _train_metrics(artifact: Path) -> dict:
    metrics = read_manifest(artifact).metrics
    assert metrics is not None
    return dict(metrics)


# -- the same scores as train ---------------------------------------------------------------


def test_eval_of_a_trained_artifact_gives_trains_last_evaluation(trained: Path) -> None:
    recorded = _train_metrics(trained)
    assert 0 < recorded["eval_mcc"] < 1 and 0.5 < recorded["eval_accuracy"] < 1  # says something
    assert recorded["eval"][-1]["mcc"] == recorded["eval_mcc"]
    result = mposurgeon.evaluate(trained, data=EVAL, batch_size=8)
    assert result.kind == "artifact" and result.labels == ["negative", "positive"]
    for key in SCORES:
        assert result.metrics[key] == recorded[f"eval_{key}"], key
    assert result.metrics["loss"] == pytest.approx(recorded["eval_loss"], abs=1e-6)
    assert result.metrics["rows"] == recorded["eval_rows"] == 112
    # Other batches pad the rows differently: the same predictions, the loss to rounding.
    other = mposurgeon.evaluate(trained, data=EVAL, batch_size=5)
    assert [other.metrics[k] for k in SCORES] == [result.metrics[k] for k in SCORES]
    assert other.metrics["loss"] == pytest.approx(result.metrics["loss"], abs=1e-6)


def test_eval_runs_the_artifact_factorized(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No merge: the model evaluated holds the artifact's MPO layers."""
    from mposurgeon.models.layers import MPOLinear
    from mposurgeon.training import tasks

    seen: list[torch.nn.Module] = []
    real = tasks.evaluate
    monkeypatch.setattr(
        "mposurgeon.stages.eval.evaluate_task",
        lambda acc, model, *a, **k: seen.append(model) or real(acc, model, *a, **k),
    )
    mposurgeon.evaluate(trained, data=EVAL, batch_size=8)
    layers = [m for m in seen[0].modules() if isinstance(m, MPOLinear)]
    assert len(layers) == len(read_manifest(trained).modules) > 0


def test_merged_and_plain_checkpoints_score_as_the_artifact(
    trained: Path, merged: Path, plain: Path
) -> None:
    factorized = mposurgeon.evaluate(trained, data=EVAL, batch_size=8).metrics
    dense = mposurgeon.evaluate(merged, data=EVAL, batch_size=8).metrics
    atol, _ = TOLERANCES[torch.float32]
    assert [dense[k] for k in SCORES] == [factorized[k] for k in SCORES]
    assert dense["loss"] == pytest.approx(factorized["loss"], abs=atol)
    as_plain = mposurgeon.evaluate(plain, data=EVAL, batch_size=8)
    assert as_plain.kind == "hf" and as_plain.metrics == dense


def test_default_label_names_accept_integer_labels(plain: Path, tmp_path: Path) -> None:
    """A config with transformers' default names (LABEL_0, LABEL_1) scores data labelled 0, 1."""
    model = tmp_path / "model"
    shutil.copytree(plain, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    data = tmp_path / "numbered.jsonl"
    rows = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    numbered = [{**r, "label": ["negative", "positive"].index(r["label"])} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in numbered), encoding="utf-8")
    result = mposurgeon.evaluate(model, data=data, batch_size=8)
    assert result.labels == ["LABEL_0", "LABEL_1"]
    assert result.metrics == mposurgeon.evaluate(plain, data=EVAL, batch_size=8).metrics


def test_eval_of_a_version_1_artifact_repeats_its_recorded_scores(tmp_path: Path) -> None:
    """A train artifact of format 1 (no MCC recorded): eval with its batch and length."""
    art = tmp_path / "v1-train"
    shutil.copytree(V1_TRAIN, art)
    recorded = _train_metrics(art)
    result = mposurgeon.evaluate(art, data=EVAL, batch_size=8, max_length=32)
    assert result.metrics["accuracy"] == recorded["eval_accuracy"]
    assert result.metrics["macro_f1"] == recorded["eval_macro_f1"]
    assert result.metrics["loss"] == pytest.approx(recorded["eval_loss"], abs=1e-6)
    assert "eval_mcc" not in recorded
    line = metrics_lines(recorded)[-1]  # train and inspect show it without MCC
    assert line.startswith("eval (classification): accuracy 0.4375, macro-F1 0.3043, loss")
    assert "MCC" not in line


# -- the command ------------------------------------------------------------------------------


def test_cli_prints_the_scores_and_writes_nothing(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    m = mposurgeon.evaluate(trained, data=EVAL, batch_size=8).metrics
    result = run_cli(capsys, "eval", trained, "--data", EVAL, "-b", "8")
    assert result.code == 0, result
    assert result.out.splitlines() == [
        f"{trained} (artifact) on sentiment-eval.jsonl: classification, labels negative, positive",
        eval_line("classification", m),
    ]
    assert "MCC" in result.out and result.err == ""
    as_json = run_cli(capsys, "eval", trained, "--data", EVAL, "-b", "8", "--json")
    assert as_json.code == 0, as_json
    report = json.loads(as_json.out)
    assert report["input"] == str(trained.resolve()) and report["task"] == "classification"
    assert report["metrics"] == m and set(m) == {"accuracy", "macro_f1", "mcc", "loss", "rows"}
    assert list(tmp_path.iterdir()) == []  # no workdir, no output
    shown = run_cli(capsys, "inspect", trained)  # train's figures, MCC among them
    assert metrics_lines(_train_metrics(trained))[-1] in shown.out and "MCC" in shown.out


def test_recipe_eval_scores_the_last_output_and_gates_on_it(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """eval reads the output before it, writes nothing, and the next stage reads that output
    too; `min_eval_accuracy` gates on its score."""
    accuracy = _train_metrics(trained)["eval_accuracy"]
    recipe = tmp_path / "scored.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {trained}\nworkdir: {tmp_path / 'w'}\nstages:\n"
        f"  - eval: {{data: {EVAL}, batch_size: 8}}\n    expect: {{min_eval_accuracy: 0.5}}\n"
        "  - merge: {verify: true}\n"
        f"  - eval: {{data: {EVAL}, batch-size: 8}}\n    name: merged-eval\n",
        encoding="utf-8",
    )
    result = run_cli(capsys, "run", recipe, "--json")
    assert result.code == 0, result
    stages = json.loads(result.out)["stages"]
    assert [s["kind"] for s in stages] == ["eval", "merge", "eval"]
    assert stages[0]["output"] is None and stages[0]["input"] == str(trained)
    assert stages[1]["input"] == str(trained) and stages[2]["input"] == stages[1]["output"]
    assert (
        stages[0]["metrics"]["eval_accuracy"] == accuracy == stages[2]["metrics"]["eval_accuracy"]
    )
    assert stages[0]["gates"][0]["ok"] and set(stages[0]["metrics"]) == {
        "eval_accuracy", "eval_macro_f1", "eval_mcc", "eval_loss", "eval_rows"
    }  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "w" / "scored").iterdir()) == [
        ".state.json", "02-merge"
    ]  # fmt: skip
    shown = run_cli(capsys, "run", recipe)  # eval runs again; merge is up to date
    assert shown.code == 0 and shown.out.count("eval (classification): accuracy") == 2, shown
    recipe.write_text(
        recipe.read_text(encoding="utf-8").replace("min_eval_accuracy: 0.5", "min_eval_accuracy: 1")
    )
    failed = run_cli(capsys, "run", recipe)
    assert failed.code == 3 and "merge" not in failed.err, failed  # later stages did not run
    assert failed.err.splitlines()[-1].startswith(
        f"error: stage 1 (eval): expect min_eval_accuracy: 1 failed (measured {accuracy:.6g})"
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ("{data: eval.jsonl, output: x}", "option 'output' is set by `run` itself"),
        ("{data: eval.jsonl, batch_size: 0}", "option 'batch_size'"),
        ("{data: eval.jsonl, max_shard_size: 1GB}", "unknown option 'max_shard_size'"),
        ("{}", "option 'data'"),
    ],
)
def test_recipe_eval_options_are_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: str, needle: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: m\nstages:\n  - eval: {options}\n", encoding="utf-8")
    assert_one_line_error(run_cli(capsys, "run", recipe), 2, "stage 1 (eval)", needle)


# -- refusals ---------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "eval", tmp_path / "nope", "--data", EVAL)
    assert_one_line_error(result, 4, "no such file or directory")
    result = run_cli(capsys, "eval", trained, "--data", tmp_path / "missing.jsonl")
    assert_one_line_error(result, 4, "no such data file", "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "x"}\n', encoding="utf-8")
    assert_one_line_error(run_cli(capsys, "eval", trained, "--data", bad), 1, "bad.jsonl line 2")
    result = run_cli(capsys, "eval", trained, "--data", EVAL, "--batch-size", "0")
    assert_one_line_error(result, 2, "--batch-size")
    assert_one_line_error(run_cli(capsys, "eval", trained), 2, "--data")


def test_labels_the_model_does_not_know_are_refused(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "three.jsonl"
    rows = ["positive", "maybe", "negative", "unsure", "maybe"]
    data.write_text("".join(json.dumps({"text": "good", "label": r}) + "\n" for r in rows))
    result = run_cli(capsys, "eval", trained, "--data", data)
    assert_one_line_error(
        result, 1, "three.jsonl line 2: label 'maybe' is not one of the model's labels "
        "(negative, positive) (1 other unknown label)",
    )  # fmt: skip
    data.write_text('{"text": "good", "label": 1}\n')  # the model's labels have names
    assert_one_line_error(run_cli(capsys, "eval", trained, "--data", data), 1, "label 1 is not")


def test_a_model_without_a_task_head_is_refused(
    tiny_classifier_dir: Callable[[str], Path],
    minilm_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for model, arch in [(tiny_classifier_dir("bert"), "BertModel"), (minilm_dir, "BertModel")]:
        result = run_cli(capsys, "eval", model, "--data", EVAL)
        assert_one_line_error(
            result, 2, f"has no trained task head ({arch})", "hint: train it first"
        )


def test_a_regression_head_of_two_outputs_is_refused(plain: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "regression"
    shutil.copytree(plain, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["problem_type"] = "regression"
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = run_cli(capsys, "eval", model, "--data", EVAL)
    assert_one_line_error(result, 2, "has a regression head with 2 outputs")
    result = run_cli(capsys, "eval", plain, "--data", EVAL, "--task", "regression")
    assert_one_line_error(result, 2, "has a classification head: --task regression does not")


def test_a_damaged_artifact_is_refused(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = tmp_path / "damaged"
    shutil.copytree(trained, art)
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run_cli(capsys, "eval", art, "--data", EVAL)
    assert_one_line_error(result, 1, "model.safetensors", "checksum")
    (art / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    assert_one_line_error(run_cli(capsys, "eval", art, "--data", EVAL), 1, MANIFEST_NAME)
