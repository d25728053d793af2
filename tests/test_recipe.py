"""`run RECIPE.yaml`: whole-recipe validation, resuming, --force/--from, gates, dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import UsageError
from mposurgeon.stages.recipe import load_recipe, run_recipe
from tests.cli_runner import run_cli

REPO = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, model: Path, stages: str, name: str = "r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"version: 1\nmodel: {model}\nworkdir: work\nstages:\n{stages}")
    return path


STAGES = """\
  - decompose: {layers: [FFN_1], num_cores: 3}
    expect: {max_rel_error: 1.0e-5}
  - inspect: {}
  - merge: {verify: true}
    expect: {max_merge_diff: 1.0e-4}
"""


@pytest.fixture
def bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert")


def test_runs_chains_and_resumes(bert: Path, tmp_path: Path, capsys) -> None:
    recipe = _recipe(tmp_path, bert, STAGES)
    first = json.loads(run_cli(capsys, "run", recipe, "--json").out)
    assert first["ok"] and [s["status"] for s in first["stages"]] == ["ran", "ran", "ran"]
    merged = tmp_path / "work" / "r" / "03-merge"
    assert read_manifest(merged).parent.path == str(tmp_path / "work" / "r" / "01-decompose")
    assert [e.stage for e in read_manifest(merged).lineage] == ["decompose", "merge"]

    again = json.loads(run_cli(capsys, "run", recipe, "--json").out)
    assert [s["status"] for s in again["stages"]] == ["skipped", "ran", "skipped"]
    assert again["stages"][0]["gates"][0]["ok"]  # gates are checked on skipped stages too

    # changing an option re-runs that stage and everything after it
    recipe.write_text(recipe.read_text().replace("num_cores: 3", "num_cores: 4"))
    changed = json.loads(run_cli(capsys, "run", recipe, "--json").out)
    assert [s["status"] for s in changed["stages"]] == ["ran", "ran", "ran"]

    forced = json.loads(run_cli(capsys, "run", recipe, "--json", "--force").out)
    assert [s["status"] for s in forced["stages"]] == ["ran", "ran", "ran"]
    from_merge = json.loads(run_cli(capsys, "run", recipe, "--json", "--from", "merge").out)
    assert [s["status"] for s in from_merge["stages"]] == ["skipped", "ran", "ran"]


def test_dry_run_plans_without_computing(bert: Path, tmp_path: Path, capsys) -> None:
    recipe = _recipe(tmp_path, bert, STAGES)
    result = run_cli(capsys, "run", recipe, "--dry-run", "--json")
    assert result.code == 0, result
    plan = json.loads(result.out)
    assert [s["status"] for s in plan["stages"]] == ["planned", "planned", "planned"]
    assert plan["stages"][2]["input"] == str(tmp_path / "work" / "r" / "01-decompose")
    assert not (tmp_path / "work").exists()


def test_failed_gate_exits_3_naming_condition_and_value(bert: Path, tmp_path, capsys) -> None:
    stages = STAGES.replace("max_merge_diff: 1.0e-4", "max_params_ratio: 0.5")
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, stages))
    assert result.code == 3, result
    assert "max_params_ratio" in result.err and "measured 1" in result.err
    assert "error: stage 3 (merge): expect max_params_ratio" in result.err


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            "  - decompose: {layer: [FFN_1]}\n",
            "stage 1 (decompose): unknown option 'layer'; did you mean 'layers'?",
        ),
        (
            "  - decompose: {}\n  - merge: {verfy: true}\n",
            "stage 2 (merge): unknown option 'verfy'; did you mean 'verify'?",
        ),
        ("  - decompse: {}\n", "stage 1: unknown stage 'decompse'; did you mean 'decompose'?"),
        ("  - decompose: {num_cores: one}\n", "stage 1 (decompose): option 'num_cores'"),
        ("  - decompose: {output: x}\n", "option 'output' is set by `run` itself"),
        ("  - decompose: {}\n    expect: {max_rel_eror: 1}\n", "did you mean 'max_rel_error'"),
        ("  - decompose: {}\n  - decompose: {}\n", "stage names repeat: decompose"),
    ],
)
def test_whole_recipe_is_validated_before_any_work(bert, tmp_path, capsys, stages, message):
    recipe = _recipe(tmp_path, bert, stages)
    result = run_cli(capsys, "run", recipe)
    assert result.code == 2, result
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def test_bad_recipe_files(tmp_path: Path, capsys) -> None:
    assert run_cli(capsys, "run", tmp_path / "missing.yaml").code == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: [unclosed\n")
    assert "not valid YAML" in run_cli(capsys, "run", bad).err
    bad.write_text("version: 2\nmodel: x\nstages: [{inspect: {}}]\n")
    assert "version must be 1" in run_cli(capsys, "run", bad).err


def test_unknown_from_stage(bert: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such stage; did you mean 'merge'"):
        run_recipe(_recipe(tmp_path, bert, STAGES), from_stage="merg")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate_and_plan(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", workdir=tmp_path)
    assert recipe.stages
    report = run_recipe(recipe.path, workdir=tmp_path, dry_run=True)
    assert all(s.status == "planned" for s in report.stages)
    assert not any(tmp_path.iterdir())


#: Recipes too long for the suite (man-sections training: pet-scaling 26 minutes, dsee 15, mpoe 7):
#: planned above, their parts tested on tiny models (tests/test_recipe_sweep.py, test_moe.py).
LONG_RECIPES = {"pet-scaling", "dsee", "mpoe", "mpop-squeeze"}


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (REPO / "recipes").glob("*.yaml") if p.stem not in LONG_RECIPES)
)
def test_shipped_recipes_run_fully_and_pass_their_gates(name: str, tmp_path: Path) -> None:
    report = run_recipe(REPO / "recipes" / f"{name}.yaml", workdir=tmp_path)
    assert report.failed_gate is None
    assert all(s.status == "ran" for s in report.stages)
    assert any(s.gates for s in report.stages)  # every shipped recipe gates something
    final = read_manifest(Path(report.stages[-1].output))
    assert final.stage == "merge" and final.metrics["verify"]["ok"]


def test_data_options_are_files_beside_the_recipe_or_data_set_ids(
    bert: Path, tmp_path: Path
) -> None:
    """A data file is resolved beside the recipe; a name that is no file there and does not
    look like a path is a data set id, kept as written (read from the local HF cache)."""
    (tmp_path / "eval.jsonl").write_text('{"text": "a", "label": 0}\n', encoding="utf-8")
    stages = (
        "  - eval: {data: eval.jsonl}\n"
        "  - eval: {data: glue, data_config: sst2}\n    name: by-id\n"
        "  - eval: {data: org/name}\n    name: by-org-id\n"
        "  - eval: {data: ./missing.jsonl}\n    name: by-path\n"
    )
    recipe = load_recipe(_recipe(tmp_path, bert, stages))
    data = [stage.options["data"] for stage in recipe.stages]
    assert data == [
        str(tmp_path / "eval.jsonl"),
        "glue",
        "org/name",
        str(tmp_path / "missing.jsonl"),
    ]


def test_data_fingerprints_follow_the_data(tmp_path: Path) -> None:
    from mposurgeon.training.data import data_fingerprint

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "a.arrow").write_bytes(b"1")
    before = data_fingerprint(saved)
    (saved / "a.arrow").write_bytes(b"2")
    assert before is not None and data_fingerprint(saved) != before
    assert data_fingerprint("some-org/not-cached") == "some-org/not-cached"
    assert data_fingerprint(tmp_path / "missing.jsonl") is None


def test_every_task_figure_has_a_gate() -> None:
    from mposurgeon.stages.recipe import Expectations, _gates

    expect = Expectations(min_eval_pearson=0.8, max_eval_perplexity=2.0, min_eval_exact_match=0.5)
    measured = {"eval_pearson": 0.83, "eval_perplexity": 2.5, "eval_exact_match": None}
    results = {g.condition: (g.measured, g.ok) for g in _gates(expect, measured)}
    assert results == {
        "min_eval_pearson": (0.83, True),
        "max_eval_perplexity": (2.5, False),
        "min_eval_exact_match": (None, False),  # not measured: the gate fails
    }


def test_an_option_added_by_a_later_version_keeps_outputs_up_to_date(tmp_path: Path) -> None:
    """A manifest written before an option existed lacks it: at its default it counts as
    equal (the output is skipped), at any other value it does not."""
    from mposurgeon.stages.recipe import Expectations as Gates
    from mposurgeon.stages.recipe import RecipeStage, _same_options
    from mposurgeon.stages.train import TrainOptions

    stage = RecipeStage(1, "train", "train", {"method": "lora", "data": "d.jsonl"}, Gates())
    out = tmp_path / "out"
    recorded = TrainOptions(**stage.options, output=out).model_dump(mode="json")
    older = {k: v for k, v in recorded.items() if k != "sparse_size"}
    assert _same_options(stage, out, dict(older))
    changed = RecipeStage(1, "train", "train", {**stage.options, "lora_r": 4}, Gates())
    assert not _same_options(changed, out, dict(older))
    dsee = RecipeStage(1, "train", "train", {**stage.options, "method": "dsee", "sparse_size": 8},
                       Gates())  # fmt: skip
    older_dsee = {**older, "method": "dsee"}
    assert not _same_options(dsee, out, older_dsee)
