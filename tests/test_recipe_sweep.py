"""Budget sweeps in recipes (issue 12, part 4): `sweep:` expands a stage into the cartesian
product of its values, validated whole at load; each point writes its own output, is skipped on
a re-run and resumed when missing; the chain goes on from the swept stage's input; `sweep.csv`
and `sweep.png` land beside the outputs."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import MposurgeonError
from mposurgeon.plot import SweepSample, plot_sweep, sweep_lines
from mposurgeon.stages.inspect import inspect
from mposurgeon.stages.recipe import (
    MAX_SWEEP_POINTS,
    SWEEP_CSV,
    SWEEP_PNG,
    load_recipe,
    run_recipe,
)
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOOP = "max_steps: 2, batch_size: 8, max_length: 16"


@pytest.fixture(scope="module")
def model(tiny_classifier_dir: Callable[[str], Path]) -> Path:
    return tiny_classifier_dir("bert")


def _data(folder: Path) -> None:
    """The shipped sentiment data, trimmed: 40 training rows, 16 eval rows."""
    for name, rows in (("train", 40), ("eval", 16)):
        lines = (REPO / "data" / f"sentiment-{name}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def _recipe(folder: Path, model: Path, stages: str, name: str = "r") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"version: 1\nmodel: {model}\nworkdir: work\nstages:\n{stages}")
    return path


def _train(method: str, extra: str = "", eval_data: bool = True) -> str:
    data = "data: train.jsonl" + (", eval_data: eval.jsonl" if eval_data else "")
    return f"{{method: {method}, {data}, {LOOP}{extra}}}"


SWEEPS = f"""\
  - train: {_train("apet")}
    name: apet
    sweep: {{budget: [300, 600], seed: [0, 1]}}
  - train: {_train("lora")}
    name: lora
    sweep: {{lora-r: [1, 2]}}
  - inspect: {{}}
  - train: {_train("bitfit", eval_data=False)}
    name: bitfit
"""
APET_POINTS = ["budget-300.seed-0", "budget-300.seed-1", "budget-600.seed-0", "budget-600.seed-1"]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _statuses(report: Any) -> list[tuple[str, str | None, str]]:
    return [(s.name, s.point, s.status) for s in report.stages]


# --- loading: expansion, point ids, validation -----------------------------------------------


def test_points_expand_in_yaml_order_first_key_outermost(model: Path, tmp_path: Path) -> None:
    _data(tmp_path)
    stages = (
        f"  - train: {_train('apet')}\n"
        "    sweep: {budget: [300, 600], seed: [0, 1, 2], lr: [0.001, 1.0e-05]}\n"
        f"  - train: {_train('lora', eval_data=False)}\n    name: lora\n"
        "    sweep: {layers: [[attention], [attention, FFN_1]], eval-data: [eval.jsonl, ./x.csv]}\n"
    )
    recipe = load_recipe(_recipe(tmp_path, model, stages))
    apet, lora = recipe.stages
    ids = [p.id for p in apet.points]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert ids[:4] == [
        "budget-300.seed-0.lr-0.001",
        "budget-300.seed-0.lr-1e-05",
        "budget-300.seed-1.lr-0.001",
        "budget-300.seed-1.lr-1e-05",
    ]
    assert ids[-1] == "budget-600.seed-2.lr-1e-05"
    runs = apet.runs()
    assert [r.point.id for r in runs] == ids
    assert runs[5].options["budget"] == 300 and runs[5].options["seed"] == 2
    assert runs[5].options["lr"] == 1.0e-05 and runs[5].options["method"] == "apet"
    assert runs[5].label == "stage 1 (train, budget-300.seed-2.lr-1e-05)"
    assert "budget" not in apet.options  # the stage's own options stay as written
    # lists join with '+'; a path value is named by its position and made absolute
    assert [p.id for p in lora.points] == [
        "layers-attention.eval_data-v1",
        "layers-attention.eval_data-v2",
        "layers-attention+FFN_1.eval_data-v1",
        "layers-attention+FFN_1.eval_data-v2",
    ]
    assert lora.points[1].values == {"layers": ["attention"], "eval_data": str(tmp_path / "x.csv")}


def _stages(sweep: str, options: str = "", kind: str = "train") -> str:
    body = _train("apet", options) if kind == "train" else "{data: eval.jsonl}"
    return f"  - {kind}: {body}\n    name: apet\n    sweep: {sweep}\n"


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (_stages("{seed: [0]}", kind="eval"), "`eval` writes no artifact and cannot be swept"),
        (
            "  - inspect: {}\n    sweep: {verify_checksums: [true]}\n",
            "`inspect` writes no artifact and cannot be swept",
        ),
        (_stages("{budgt: [300]}"), "stage 1 (apet): sweep: unknown option 'budgt'; did you"),
        (_stages("{budget: [300]}", ", budget: 300"), "option 'budget' is both set and swept"),
        (_stages("{budget: []}"), "sweep: 'budget' must be a non-empty list of values"),
        (_stages("{budget: 300}"), "sweep: 'budget' must be a non-empty list of values"),
        (_stages("{seed: [0, 0]}"), "sweep: 'seed' lists 0 twice"),
        (_stages("{lora-r: [1], lora_r: [2]}"), "sweep: option 'lora_r' is given twice"),
        (_stages("{seed: [0], seed: [1]}"), "key 'seed' repeats"),
        (_stages("{seed: [{a: 1}]}"), "{'a': 1} is not a number, string, boolean"),
        (_stages("{seed: [[[0]]]}"), "is not a number, string, boolean"),
        (_stages("{output: [a]}"), "sweep: option 'output' is set by `run` itself"),
        (_stages("[seed]"), "stage 1 (apet): sweep must map options to lists of values"),
        (_stages("{}"), "stage 1 (apet): sweep must map options to lists of values"),
        (
            _stages(f"{{seed: {list(range(MAX_SWEEP_POINTS + 1))}}}"),
            f"sweep has {MAX_SWEEP_POINTS + 1} points, more than {MAX_SWEEP_POINTS}",
        ),
        (
            _stages("{seed: [0, 1], budget: [300, 0]}"),
            "stage 1 (apet): sweep point seed-0.budget-0: option 'budget': must be at least 1",
        ),
        (
            _stages("{seed: [0, 1], lora_r: [1, 2]}"),
            "stage 1 (apet): sweep point seed-0.lora_r-1:",
        ),
    ],
)
def test_bad_sweeps_are_refused_at_load_in_one_line(model, tmp_path, capsys, stages, message):
    _data(tmp_path)
    result = run_cli(capsys, "run", _recipe(tmp_path, model, stages))
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "work").exists()


def test_an_error_in_an_unswept_option_names_the_stage_not_a_point(model, tmp_path, capsys):
    _data(tmp_path)
    stages = _stages("{seed: [0, 1]}", ", budgett: 3")
    line = assert_one_line_error(
        run_cli(capsys, "run", _recipe(tmp_path, model, stages)),
        2,
        "stage 1 (apet): unknown option 'budgett'; did you mean 'budget'?",
    )
    assert "sweep point" not in line


def test_a_point_output_leaving_the_recipe_directory_is_refused(model, tmp_path, capsys):
    _data(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (tmp_path / "work" / "r").mkdir(parents=True)
    (tmp_path / "work" / "r" / "01-apet").symlink_to(victim, target_is_directory=True)
    result = run_cli(capsys, "run", _recipe(tmp_path, model, _stages("{seed: [0]}")))
    assert_one_line_error(result, 2, "stage 1 (apet, seed-0)", "outside", "01-apet")
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def test_dry_run_plans_every_point_and_writes_nothing(model: Path, tmp_path: Path) -> None:
    _data(tmp_path)
    report = run_recipe(_recipe(tmp_path, model, SWEEPS), dry_run=True)
    assert [(s.name, s.point) for s in report.stages][:5] == [
        *(("apet", p) for p in APET_POINTS),
        ("lora", "lora_r-1"),
    ]
    assert {s.status for s in report.stages} == {"planned"}
    assert report.stages[-1].input == str(model)  # after the sweeps: the recipe's model
    assert report.sweep is None and not (tmp_path / "work").exists()


# --- running: outputs, CSV, plot, skip and resume --------------------------------------------


@pytest.fixture(scope="module")
def swept(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The SWEEPS recipe run once: 4 APET points, 2 LoRA points, then inspect and BitFit."""
    folder = tmp_path_factory.mktemp("sweep")
    _data(folder)
    path = _recipe(folder, model, SWEEPS)
    report = run_recipe(path)
    root = folder / "work" / "r"
    return {
        "folder": folder,
        "path": path,
        "report": report,
        "root": root,
        "csv": (root / SWEEP_CSV).read_bytes(),
    }


def test_every_point_writes_its_own_output(swept: dict[str, Any], model: Path) -> None:
    report, root = swept["report"], swept["root"]
    assert _statuses(report) == [
        *(("apet", p, "ran") for p in APET_POINTS),
        ("lora", "lora_r-1", "ran"),
        ("lora", "lora_r-2", "ran"),
        ("inspect", None, "ran"),
        ("bitfit", None, "ran"),
    ]
    for entry in report.stages[:6]:
        out = root / ("01-apet" if entry.name == "apet" else "02-lora") / entry.point
        assert entry.output == str(out)
        manifest = read_manifest(out)
        assert manifest.stage == "train" and manifest.parent is None
        assert manifest.base.path == str(model)
        for key, value in entry.values.items():
            assert manifest.options[key] == value
    assert read_manifest(root / "01-apet" / "budget-600.seed-1").metrics["seed"] == 1
    state = json.loads((root / ".state.json").read_text())["stages"]
    assert set(state) == {
        *(f"01-apet/{p}" for p in APET_POINTS),
        "02-lora/lora_r-1",
        "02-lora/lora_r-2",
        "04-bitfit",
    }


def test_the_stage_after_a_sweep_reads_the_swept_stage_input(
    swept: dict[str, Any], model: Path
) -> None:
    report, root = swept["report"], swept["root"]
    assert [s.input for s in report.stages] == [str(model)] * len(report.stages)
    assert report.stages[6].result["path"] == str(model)  # inspect reported on the model
    bitfit = read_manifest(root / "04-bitfit")
    assert bitfit.parent is None and bitfit.base.path == str(model)
    assert bitfit.metrics["method"] == "bitfit"


def test_csv_has_a_row_per_point_with_exact_trainable_counts(swept: dict[str, Any]) -> None:
    report, root = swept["report"], swept["root"]
    rows = _csv(root / SWEEP_CSV)
    assert list(rows[0])[:7] == [
        "stage",
        "point",
        "method",
        "budget",
        "seed",
        "lora_r",
        "trainable_params",
    ]
    assert list(rows[0])[-2:] == ["seconds", "output"]
    assert [(r["stage"], r["point"], r["method"]) for r in rows] == [
        *(("apet", p, "apet") for p in APET_POINTS),
        ("lora", "lora_r-1", "lora"),
        ("lora", "lora_r-2", "lora"),
    ]
    assert [(r["budget"], r["seed"], r["lora_r"]) for r in rows] == [
        ("300", "0", ""),
        ("300", "1", ""),
        ("600", "0", ""),
        ("600", "1", ""),
        ("", "", "1"),
        ("", "", "2"),
    ]
    counts = []
    for row in rows:
        params = inspect(row["output"], verify=False)["params"]
        assert int(row["trainable_head"]) == params["trainable_head"] > 0
        assert int(row["trainable_params"]) == params["trainable"] - params["trainable_head"]
        metrics = read_manifest(Path(row["output"])).metrics
        for key in ("eval_accuracy", "eval_macro_f1", "eval_loss"):
            assert float(row[key]) == metrics[key]
        assert "eval_rows" not in row  # a count, not a metric
        assert float(row["seconds"]) > 0
        counts.append(int(row["trainable_params"]))
    assert counts[:4] == [300, 300, 600, 600]  # APET trains exactly its budget
    assert counts[5] == 2 * counts[4] > 0  # LoRA's count is linear in its rank
    assert report.sweep.csv == str(root / SWEEP_CSV)
    assert report.sweep.metric == "eval_accuracy"
    assert [r["point"] for r in report.sweep.rows] == [r["point"] for r in rows]


def test_plot_is_a_png_of_means_over_seeds(swept: dict[str, Any]) -> None:
    report, root = swept["report"], swept["root"]
    assert report.sweep.png == str(root / SWEEP_PNG) and report.sweep.plot_error is None
    assert (root / SWEEP_PNG).read_bytes()[:8] == PNG_MAGIC
    rows = _csv(root / SWEEP_CSV)
    apet, lora = report.sweep.lines
    assert (apet.label, apet.x, apet.count) == ("apet", [300, 600], [2, 2])
    for i, budget in enumerate(("300", "600")):
        accuracies = [float(r["eval_accuracy"]) for r in rows if r["budget"] == budget]
        assert apet.mean[i] == pytest.approx(sum(accuracies) / 2, abs=1e-12)
        assert (apet.low[i], apet.high[i]) == (min(accuracies), max(accuracies))
    assert lora.label == "lora" and lora.count == [1, 1]
    assert lora.x == [int(r["trainable_params"]) for r in rows[4:]]


def test_rerun_skips_every_point_and_rewrites_the_same_csv(swept, capsys) -> None:
    root = swept["root"]
    (root / SWEEP_CSV).unlink()
    result = run_cli(capsys, "run", swept["path"], "--json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert [(s["name"], s["point"], s["status"]) for s in data["stages"]] == [
        *(("apet", p, "skipped") for p in APET_POINTS),
        ("lora", "lora_r-1", "skipped"),
        ("lora", "lora_r-2", "skipped"),
        ("inspect", None, "ran"),
        ("bitfit", None, "skipped"),
    ]
    assert data["stages"][0]["values"] == {"budget": 300, "seed": 0}
    assert (root / SWEEP_CSV).read_bytes() == swept["csv"]  # seconds: as recorded when it ran
    assert data["sweep"]["csv"] == str(root / SWEEP_CSV)
    assert data["sweep"]["png"] == str(root / SWEEP_PNG)
    assert len(data["sweep"]["rows"]) == 6 and data["sweep"]["metric"] == "eval_accuracy"

    text = run_cli(capsys, "run", swept["path"])
    assert text.code == 0, text
    assert "apet [budget-300.seed-0]" in text.out
    assert f"wrote sweep.csv, sweep.png in {root}" in " ".join(text.out.split())


def test_a_missing_point_reruns_alone_and_from_reruns_the_sweep(swept, capsys) -> None:
    root = swept["root"]
    before = _csv(root / SWEEP_CSV)
    shutil.rmtree(root / "01-apet" / "budget-600.seed-0")  # as if interrupted there
    plan = run_recipe(swept["path"], dry_run=True)
    assert [s.status for s in plan.stages[:6]] == [
        "skipped",
        "skipped",
        "planned",
        "skipped",
        "skipped",
        "skipped",
    ]
    assert plan.stages[7].status == "skipped"  # the chain did not move: bitfit is up to date

    report = run_recipe(swept["path"])
    ran = [(s.name, s.point) for s in report.stages if s.status == "ran"]
    assert ran == [("apet", "budget-600.seed-0"), ("inspect", None)]
    after = _csv(root / SWEEP_CSV)
    assert _without_seconds(after) == _without_seconds(before)  # seeded: the same figures

    report = run_recipe(swept["path"], from_stage="lora")
    assert _statuses(report)[3:] == [
        ("apet", "budget-600.seed-1", "skipped"),
        ("lora", "lora_r-1", "ran"),
        ("lora", "lora_r-2", "ran"),
        ("inspect", None, "ran"),
        ("bitfit", None, "ran"),
    ]


def test_gates_apply_to_every_point_and_the_csv_still_lands(model, tmp_path, capsys) -> None:
    _data(tmp_path)
    stages = _stages("{seed: [0, 1]}") + "    expect: {min_eval_accuracy: 1.01}\n"
    result = run_cli(capsys, "run", _recipe(tmp_path, model, stages), "--json")
    assert result.code == 3, result
    data = json.loads(result.out)
    assert "stage 1 (apet, seed-0): expect min_eval_accuracy" in data["error"]["message"]
    assert [(s["point"], s["status"]) for s in data["stages"]] == [("seed-0", "failed")]
    rows = _csv(tmp_path / "work" / "r" / SWEEP_CSV)
    assert [(r["point"], r["trainable_params"] != "", r["output"] != "") for r in rows] == [
        ("seed-0", True, True),
        ("seed-1", False, False),  # not run: empty cells
    ]


def test_without_matplotlib_the_csv_lands_and_the_report_says_why(
    model, tmp_path, monkeypatch
) -> None:
    import mposurgeon.plot

    def missing(what: str = "--plot") -> None:
        raise MposurgeonError(f"{what} needs matplotlib, which is not installed", hint="pip")

    _data(tmp_path)
    root = tmp_path / "work" / "r"
    root.mkdir(parents=True)
    (root / SWEEP_PNG).write_bytes(PNG_MAGIC)  # an older run's plot: removed, not left stale
    monkeypatch.setattr(mposurgeon.plot, "require_matplotlib", missing)
    report = run_recipe(_recipe(tmp_path, model, _stages("{seed: [0]}")))
    assert report.sweep.png is None and not (root / SWEEP_PNG).exists()
    assert (
        report.sweep.plot_error == "the sweep plot needs matplotlib, which is not installed (pip)"
    )
    assert len(_csv(root / SWEEP_CSV)) == 1


def test_points_without_an_eval_metric_are_listed_but_not_plotted(model, tmp_path, capsys) -> None:
    _data(tmp_path)
    stages = f"  - train: {_train('bitfit', eval_data=False)}\n    sweep: {{seed: [0]}}\n"
    recipe = _recipe(tmp_path, model, stages)
    report = run_recipe(recipe)
    rows = _csv(tmp_path / "work" / "r" / SWEEP_CSV)
    assert len(rows) == 1 and rows[0]["eval_accuracy"] == ""
    assert int(rows[0]["trainable_params"]) > 0
    assert report.sweep.png is None and report.sweep.metric is None
    assert "no point recorded an eval metric" in report.sweep.plot_error

    forced = run_cli(capsys, "run", recipe, "--force")  # --force re-runs every point
    assert forced.code == 0, forced
    assert "stage 1 (train, seed-0): ran" in forced.err
    assert "warning: no sweep plot: no point recorded an eval metric" in forced.err
    assert "wrote sweep.csv in" in forced.out


# --- the plot's aggregation ------------------------------------------------------------------


def test_sweep_lines_average_seeds_per_setting_sorted_by_x(tmp_path: Path) -> None:
    samples = [
        SweepSample("lora", '{"lora_r": 8}', 800, 0.9),
        SweepSample("apet", '{"budget": 4096}', 4096, 0.75),
        SweepSample("apet", '{"budget": 64}', 64, 0.5),
        SweepSample("apet", '{"budget": 64}', 64, 0.7),
        SweepSample("apet", '{"budget": 4096}', 4096, 0.85),
        SweepSample("apet", '{"budget": 64}', 64, 0.6),
    ]
    lora, apet = sweep_lines(samples)
    assert (lora.label, lora.x, lora.mean, lora.count) == ("lora", [800], [0.9], [1])
    assert apet.label == "apet" and apet.x == [64, 4096] and apet.count == [3, 2]
    assert apet.mean == pytest.approx([0.6, 0.8], abs=1e-12)
    assert (apet.low, apet.high) == ([0.5, 0.75], [0.7, 0.85])
    out = plot_sweep([apet, lora], tmp_path / "deep" / "s.png", metric="eval_accuracy")
    assert out.read_bytes()[:8] == PNG_MAGIC
