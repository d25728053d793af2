"""`inspect --plot`: a PNG of the bond spectra, or of a trained artifact's training curves (the
series drawn equal the manifest's), and a clear error without matplotlib."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import mposurgeon
from mposurgeon.artifact.manifest import MANIFEST_NAME, read_manifest
from mposurgeon.errors import MposurgeonError, UsageError
from mposurgeon.plot import (
    ModuleSpectra,
    Series,
    TrainingCurves,
    curves_figure,
    module_type,
    plot_curves,
    plot_spectra,
    training_curves,
)
from mposurgeon.stages import inspect as inspect_stage
from tests.cli_runner import assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


@pytest.fixture
def tiny_art(tiny_model_dir, tmp_path: Path, capsys) -> Path:
    out = tmp_path / "art"
    result = run_cli(capsys, "decompose", tiny_model_dir("bert"), "-o", out, "-n", "3", "-q")
    assert result.code == 0, result
    return out


def test_inspect_plot_writes_a_png(tiny_art: Path, tmp_path: Path, capsys) -> None:
    cut = tmp_path / "cut"
    assert run_cli(capsys, "truncate", tiny_art, "-o", cut, "--max-bond", "6", "-q").code == 0
    png = tmp_path / "figs" / "spectra.png"
    result = run_cli(capsys, "inspect", cut, "--plot", png)
    assert result.code == 0, result
    assert f"bond spectra plotted to {png}" in result.out
    data = png.read_bytes()
    assert len(data) > 10_000 and data.startswith(PNG_MAGIC)
    report = json.loads(run_cli(capsys, "inspect", tiny_art, "--json", "--plot", png).out)
    assert report["plot"] == str(png) and png.read_bytes() != data  # redrawn for the other input


def test_plot_without_mpo_modules_is_a_usage_error(tiny_model_dir, tmp_path, capsys) -> None:
    png = tmp_path / "s.png"
    result = run_cli(capsys, "inspect", tiny_model_dir("bert"), "--plot", png)
    assert result.code == 2 and "no MPO modules" in result.err
    assert not png.exists()


def _block_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)


def test_missing_matplotlib_gives_the_install_hint(tiny_art: Path, tmp_path, capsys, monkeypatch):
    _block_matplotlib(monkeypatch)
    png = tmp_path / "s.png"
    result = run_cli(capsys, "inspect", tiny_art, "--plot", png)
    assert result.code == 1, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'pip install "mposurgeon[plot]"' in lines[0], result.err
    assert not png.exists()
    with pytest.raises(MposurgeonError, match="matplotlib"):
        mposurgeon.inspect(tiny_art, plot=png)


def test_many_modules_stay_one_row_per_module_type(tmp_path: Path) -> None:
    assert module_type("encoder.layer.11.attention.self.query") == (
        "encoder.layer.*.attention.self.query",
        11,
    )
    assert module_type("lm_head") == ("lm_head", None)
    modules = [
        ModuleSpectra(
            name=f"decoder.block.{layer}.layer.{sub}.{kind}",
            spectra=[[1.0 / (i + 1) for i in range(r)] for r in (4, 30, 8)],
            full_bonds=[4, 40, 8],
        )
        for layer in range(24)
        for sub, kind in [(0, "SelfAttention.q"), (1, "DenseReluDense.wi"), (0, "zero")]
    ]
    modules.append(ModuleSpectra("lm_head", [[0.0, 0.0]], [2]))  # nothing positive to draw
    png = plot_spectra(modules, tmp_path / "many.png", title="t5-like")
    assert png.read_bytes().startswith(PNG_MAGIC)


# -- training curves -------------------------------------------------------------------------


def _train(source: Path, out: Path, **kwargs: Any) -> Path:
    mposurgeon.train(source, output=out, method="lightweight", data=TRAIN, batch_size=8, **kwargs)
    return out


@pytest.fixture(scope="module")
def trained(tiny_mpo: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> Path:
    """A train artifact of 4 steps with an evaluation every 2 (MPO modules kept)."""
    out = tmp_path_factory.mktemp("curves") / "tr"
    return _train(tiny_mpo, out, eval_data=EVAL, max_steps=4, eval_every=2)


def _drawn(fig: Any) -> list[list[tuple[str, list[float], list[float]]]]:
    """Per visible panel: every line drawn, as (label, x, y)."""
    return [
        [
            (line.get_label(), [float(x) for x in line.get_xdata()], list(line.get_ydata()))
            for line in ax.get_lines()
        ]
        for ax in fig.axes
        if ax.axison
    ]


def test_trained_artifact_plots_its_training_curves(
    trained: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    drawn: list[tuple[TrainingCurves, str]] = []
    real_plot = inspect_stage.plot_curves

    def spy(curves: TrainingCurves, path: Path, title: str = "") -> Path:
        drawn.append((curves, title))
        return real_plot(curves, path, title)

    def no_spectra(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("a trained artifact gets its training curves, not bond spectra")

    monkeypatch.setattr(inspect_stage, "plot_curves", spy)
    monkeypatch.setattr(inspect_stage, "plot_spectra", no_spectra)
    png = tmp_path / "figs" / "curves.png"
    result = run_cli(capsys, "inspect", trained, "--plot", png)
    assert result.code == 0, result
    assert f"training curves plotted to {png}" in result.out and "bond spectra" not in result.out
    assert png.read_bytes().startswith(PNG_MAGIC)
    report = json.loads(run_cli(capsys, "inspect", trained, "--json", "--plot", png).out)
    assert report["plot"] == str(png) and report["stage"] == "train"
    assert any(m["kind"] == "mpo" for m in report["modules"])  # MPO modules, yet curves

    m = read_manifest(trained).metrics
    assert m is not None and m["steps"] == 4 and [e["step"] for e in m["eval"]] == [2, 4]
    evals = m["eval"]
    expected = TrainingCurves(
        loss=Series(
            "training loss",
            [p["step"] for p in m["loss_history"]],
            [p["loss"] for p in m["loss_history"]],
        ),
        eval_loss=Series("eval loss", [2, 4], [e["loss"] for e in evals]),
        panels=[
            [Series(k, [2, 4], [e[k] for e in evals]) for k in ("accuracy", "macro_f1", "mcc")]
        ],
        best_step=None,
    )
    assert expected.loss.steps == [1, 2, 3, 4]
    assert [d[0] for d in drawn] == [expected, expected]
    task = f", task {m['task']}" if m.get("task") is not None else ""  # recorded by newer trains
    assert drawn[0][1] == f"{report['name']}, method lightweight{task}"
    assert _drawn(curves_figure(expected)) == [
        [
            ("training loss", [1, 2, 3, 4], expected.loss.values),
            ("eval loss", [2, 4], expected.eval_loss.values),
        ],
        [(s.label, [2, 4], s.values) for s in expected.panels[0]],
    ]


def test_without_eval_data_only_the_loss_panel(tiny_mpo: Path, tmp_path: Path, one_torch_thread):
    out = _train(tiny_mpo, tmp_path / "tr", max_steps=3)
    metrics = read_manifest(out).metrics
    assert metrics is not None and metrics["eval"] == []
    curves = training_curves(metrics)
    history = metrics["loss_history"]
    assert curves == TrainingCurves(
        Series("training loss", [1, 2, 3], [p["loss"] for p in history]), None, [], None
    )
    assert _drawn(curves_figure(curves)) == [[("training loss", [1, 2, 3], curves.loss.values)]]
    png = tmp_path / "c.png"
    assert mposurgeon.inspect(out, plot=png)["plot"] == str(png)
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_other_task_metrics_and_best_step(tmp_path: Path) -> None:
    """Metrics other tasks record: correlations and exact match share a panel, mse and
    perplexity get one each; counts, text, missing and infinite values are not drawn."""
    counts = {"rows": 64, "tokens": 900, "note": "x"}
    metrics = {
        "method": "full",
        "task": "regression",
        "steps": 30,
        "loss_history": [
            {"step": 10, "loss": 4.0},
            {"step": 20, "loss": None},
            {"step": 30, "loss": 0.25},
        ],
        "eval": [
            {
                "step": 10,
                "pearson": 0.5,
                "spearman": 0.4,
                "mse": 2.0,
                "perplexity": 300.0,
                "loss": 1.5,
                **counts,
            },
            {
                "step": 20,
                "pearson": 0.9,
                "spearman": 0.8,
                "mse": 0.5,
                "perplexity": 12.0,
                "loss": 0.7,
                "exact_match": 0.25,
                **counts,
            },
            {
                "step": 30,
                "pearson": None,
                "spearman": 0.7,
                "mse": 1.0,
                "perplexity": float("inf"),
                "loss": 0.9,
                "exact_match": 0.5,
                **counts,
            },
        ],
        "best_step": 20,
    }
    curves = training_curves(metrics)
    assert curves == TrainingCurves(
        loss=Series("training loss", [10, 30], [4.0, 0.25]),
        eval_loss=Series("eval loss", [10, 20, 30], [1.5, 0.7, 0.9]),
        panels=[
            [
                Series("pearson", [10, 20], [0.5, 0.9]),
                Series("spearman", [10, 20, 30], [0.4, 0.8, 0.7]),
                Series("exact_match", [20, 30], [0.25, 0.5]),
            ],
            [Series("mse", [10, 20, 30], [2.0, 0.5, 1.0])],
            [Series("perplexity", [10, 20], [300.0, 12.0])],
        ],
        best_step=20,
    )
    fig = curves_figure(curves, title="t")
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == 6 and len(panels) == 4  # 2 rows of 3, two left empty
    for lines in _drawn(fig):
        best = [line for line in lines if line[1] == [20.0, 20.0]]
        assert len(best) == 1  # the dashed best-step line in every panel
    assert "best step 20" in panels[0].get_legend_handles_labels()[1]
    # log y where the values span more than 10x (loss 4 -> 0.25, perplexity 300 -> 12)
    assert [ax.get_yscale() for ax in panels] == ["log", "linear", "linear", "log"]
    png = tmp_path / "o.png"
    assert plot_curves(curves, png, "t") == png and png.read_bytes().startswith(PNG_MAGIC)
    assert training_curves({**metrics, "best_step": True}).best_step is None


def test_zero_steps_is_a_one_line_error(trained: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(UsageError, match=r"no training loss \(it trained 0 steps\)"):
        training_curves({"steps": 0, "loss_history": []})
    art = tmp_path / "zero"
    shutil.copytree(trained, art)
    data = json.loads((art / MANIFEST_NAME).read_text())
    data["metrics"].update(steps=0, loss_history=[], final_loss=None)
    (art / MANIFEST_NAME).write_text(json.dumps(data))
    png = tmp_path / "z.png"
    result = run_cli(capsys, "inspect", art, "--plot", png)
    assert_one_line_error(result, 2, "no training curves to plot", "0 steps", "--max-steps")
    assert not png.exists()


def test_trained_artifact_without_matplotlib(trained: Path, tmp_path, capsys, monkeypatch):
    _block_matplotlib(monkeypatch)
    png = tmp_path / "c.png"
    result = run_cli(capsys, "inspect", trained, "--plot", png)
    assert_one_line_error(result, 1, "--plot needs matplotlib", 'pip install "mposurgeon[plot]"')
    assert not png.exists()
