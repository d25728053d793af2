"""`run RECIPE.yaml` against hostile or careless recipes (issue 9): names that are paths,
outputs over inputs, YAML bombs and odd files, errors named by stage, JSON on failure, and a
skip key that follows the data's contents and is the same whatever the paths' spelling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mposurgeon.stages.recipe import MAX_RECIPE_BYTES
from tests.cli_runner import CliResult, run_cli

DECOMPOSE = "  - decompose: {layers: [FFN_1], num_cores: 3}\n"


@pytest.fixture
def bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert")


def _recipe(tmp_path: Path, model: Path | str, stages: str, name: str = "r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"version: 1\nmodel: {model}\nworkdir: work\nstages:\n{stages}")
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _usage_error(result: CliResult, *fragments: str) -> None:
    assert result.code == 2, result
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "internal error" not in result.err, result.err
    for fragment in fragments:
        assert fragment in result.err, result.err


# --- 1. stage and recipe names are one safe path component ----------------------------------


@pytest.mark.parametrize(
    "name",
    ["x/../../../victim", "ABSOLUTE", "..", ".hidden", "a\\\\b", "a\\0b", "a" * 200, "x/y"],
)
def test_stage_name_must_be_one_safe_path_component(bert, tmp_path, capsys, name) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    if name == "ABSOLUTE":
        name = str(victim)
    recipe = _recipe(tmp_path, bert, f'  - name: "{name}"\n    decompose: {{num_cores: 3}}\n')
    result = run_cli(capsys, "run", recipe)
    _usage_error(result, "stage 1", "name")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("stem", ["..", ".hidden", "bad name!"])
def test_recipe_file_name_must_be_a_safe_path_component(bert, tmp_path, capsys, stem) -> None:
    recipe = _recipe(tmp_path, bert, DECOMPOSE, name=stem)
    result = run_cli(capsys, "run", recipe)
    _usage_error(result, "recipe name")
    assert not (tmp_path / "work").exists() and not (tmp_path / "01-decompose").exists()


def test_output_leaving_the_recipe_directory_through_a_symlink_is_refused(
    bert, tmp_path, capsys
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (tmp_path / "work" / "r").mkdir(parents=True)
    (tmp_path / "work" / "r" / "01-decompose").symlink_to(victim, target_is_directory=True)
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, DECOMPOSE))
    _usage_error(result, "stage 1 (decompose)", "outside")
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


# --- 2. no output over an input --------------------------------------------------------------


def test_stage_output_may_not_replace_the_recipe_model(bert, tmp_path, capsys) -> None:
    model = tmp_path / "work" / "r" / "02-t2"
    shutil.copytree(bert, model)
    before = _snapshot(model)
    stages = DECOMPOSE + "  - name: t2\n    truncate: {max_bond: 2}\n"
    result = run_cli(capsys, "run", _recipe(tmp_path, model, stages))
    _usage_error(result, "stage 2 (t2)", "is the recipe's model")
    assert _snapshot(model) == before
    assert not (tmp_path / "work" / "r" / "01-decompose").exists()


def test_stage_output_may_not_lie_inside_the_recipe_model(bert, tmp_path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(bert, model)
    before = _snapshot(model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: model\nworkdir: model/out\nstages:\n{DECOMPOSE}")
    result = run_cli(capsys, "run", recipe)
    _usage_error(result, "stage 1 (decompose)", "inside the recipe's model")
    assert _snapshot(model) == before


def test_data_file_inside_a_replaced_output_is_refused(bert, tmp_path, capsys) -> None:
    data = tmp_path / "work" / "r" / "01-select" / "train.jsonl"
    data.parent.mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "data" / "sentiment-train.jsonl", data)
    before = _snapshot(data.parent)
    stages = f"  - select: {{method: fisher, data: {data}, top_n: 1, max_batches: 1}}\n"
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, stages))
    _usage_error(result, "stage 1 (select)", "data", "inside")
    assert _snapshot(data.parent) == before


# --- 11 and 17: YAML bombs, deep nesting, odd files and keys ----------------------------------


def test_yaml_alias_bomb_is_refused_without_expanding(bert, tmp_path, capsys) -> None:
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    text = (
        "version: 1\nmodel: {m}\nworkdir: work\ndescription:\n"
        + "".join(f"  {line}\n" for line in levels)
        + "stages:\n  - name: *a5\n    decompose: {{num_cores: 3}}\n"
    ).format(m=bert)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    _usage_error(run_cli(capsys, "run", recipe, "--dry-run"), "r.yaml", "alias")


def test_oversized_recipe_file_is_refused(bert, tmp_path, capsys) -> None:
    recipe = _recipe(tmp_path, bert, DECOMPOSE)
    recipe.write_text(recipe.read_text() + "#" * MAX_RECIPE_BYTES + "\n")
    _usage_error(run_cli(capsys, "run", recipe, "--dry-run"), "r.yaml", "larger than")


def test_deeply_nested_recipe_is_refused(bert, tmp_path, capsys) -> None:
    recipe = _recipe(tmp_path, bert, DECOMPOSE)
    recipe.write_text(recipe.read_text() + "description: " + "[" * 5000 + "]" * 5000 + "\n")
    _usage_error(run_cli(capsys, "run", recipe, "--dry-run"), "r.yaml", "nested")


def test_non_utf8_recipe_is_refused(bert, tmp_path, capsys) -> None:
    recipe = _recipe(tmp_path, bert, DECOMPOSE)
    recipe.write_bytes(recipe.read_bytes() + b"description: caf\xe9\n")
    _usage_error(run_cli(capsys, "run", recipe, "--dry-run"), "r.yaml", "UTF-8")


@pytest.mark.parametrize(
    ("stages", "fragments"),
    [
        ("  - 1: {}\n", ("stage 1", "key 1", "string")),
        ("  - decompose: {}\n    7: {}\n", ("stage 1", "key 7")),
        ('  - name: "a\\0b"\n    decompose: {}\n', ("stage 1", "name", "NUL")),
        ("  - name: [a, b]\n    decompose: {}\n", ("stage 1", "name", "string")),
        ("  - name: 12\n    decompose: {}\n", ("stage 1", "name", "string")),
        ('  - "": ~\n    " \\x85": ~\n', ("stage 1", "exactly one stage", "\\x85")),
        ('  - select: {method: fisher, data: "d\\0.jsonl"}\n', ("stage 1 (select)", "data")),
    ],
)
def test_odd_stage_keys_and_names_are_one_line_usage_errors(
    bert, tmp_path, capsys, stages, fragments
) -> None:
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, stages), "--dry-run")
    _usage_error(result, *fragments)


@pytest.mark.parametrize(
    ("top", "fragments"),
    [
        ('version: 1\nmodel: "m\\0"\nstages: [{inspect: {}}]\n', ("model", "NUL")),
        ("version: 1\nmodel: m\nworkdir: [a]\nstages: [{inspect: {}}]\n", ("workdir",)),
        ('version: 1\nmodel: m\nworkdir: "w\\0"\nstages: [{inspect: {}}]\n', ("workdir", "NUL")),
        ("version: 1\n3: m\nmodel: m\nstages: [{inspect: {}}]\n", ("unknown key 3",)),
    ],
)
def test_odd_top_level_fields_are_one_line_usage_errors(tmp_path, capsys, top, fragments) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(top)
    _usage_error(run_cli(capsys, "run", recipe, "--dry-run"), "r.yaml", *fragments)


# --- 21 and 24: failures name their stage, keep their exit code, and --json tells all --------

FAILING_STAGES = DECOMPOSE + "  - inspect: {}\n  - merge: {}\n  - truncate: {max_bond: 2}\n"


def test_failing_stage_is_named_and_keeps_its_exit_code(bert, tmp_path, capsys) -> None:
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, FAILING_STAGES))
    assert result.code == 2, result
    assert "error: stage 4 (truncate): " in result.err
    assert "internal error" not in result.err

    missing = _recipe(tmp_path, tmp_path / "no-such-model", DECOMPOSE)
    result = run_cli(capsys, "run", missing)
    assert result.code == 4, result
    assert "error: stage 1 (decompose): " in result.err


def test_json_run_reports_the_stages_before_a_failure(bert, tmp_path, capsys) -> None:
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, FAILING_STAGES), "--json")
    assert result.code == 2, result
    summary = json.loads(result.out)  # exactly one JSON object
    assert summary["ok"] is False
    assert [s["status"] for s in summary["stages"]] == ["ran", "ran", "ran", "failed"]
    assert summary["stages"][2]["output"] == str(tmp_path / "work" / "r" / "03-merge")
    error = summary["error"]
    assert error["exit_code"] == 2
    assert error["message"].startswith("stage 4 (truncate): ")
    assert error["hint"]


def test_json_run_gate_failure_has_the_error_object(bert, tmp_path, capsys) -> None:
    stages = DECOMPOSE.rstrip("\n") + "\n    expect: {max_rel_error: 0.0}\n"
    result = run_cli(capsys, "run", _recipe(tmp_path, bert, stages), "--json")
    assert result.code == 3, result
    summary = json.loads(result.out)
    assert summary["ok"] is False and summary["stages"][0]["status"] == "failed"
    assert summary["error"]["exit_code"] == 3 and "max_rel_error" in summary["error"]["message"]


# --- the skip key: data contents, and one key whatever the spelling ---------------------------


@pytest.fixture
def classifier(tiny_classifier_dir) -> Path:
    return tiny_classifier_dir("bert")


def _select_recipe(tmp_path: Path, model: Path) -> Path:
    shutil.copy(Path(__file__).parents[1] / "data" / "sentiment-train.jsonl", tmp_path / "d.jsonl")
    stages = (
        "  - select: {method: fisher, data: d.jsonl, top_n: 1, weight_types: [FFN_1],"
        " max_batches: 1, batch_size: 4, max_length: 16}\n"
    )
    return _recipe(tmp_path, model, stages)


def _statuses(capsys, *args: object) -> list[str]:
    result = run_cli(capsys, "run", *args, "--json")
    assert result.code == 0, result
    return [s["status"] for s in json.loads(result.out)["stages"]]


def test_changed_data_contents_rerun_the_stage(classifier, tmp_path, capsys) -> None:
    recipe = _select_recipe(tmp_path, classifier)
    assert _statuses(capsys, recipe) == ["ran"]
    assert _statuses(capsys, recipe) == ["skipped"]
    data = tmp_path / "d.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(reversed(lines)))  # same path, same size, other contents
    assert _statuses(capsys, recipe, "--dry-run") == ["planned"]
    assert _statuses(capsys, recipe) == ["ran"]
    assert _statuses(capsys, recipe) == ["skipped"]


def test_skip_key_is_the_same_for_any_spelling_of_the_paths(
    classifier, tmp_path, capsys, monkeypatch
) -> None:
    model = tmp_path / "model"
    shutil.copytree(classifier, model)
    recipe = _select_recipe(tmp_path, Path("model"))
    recipe.write_text(recipe.read_text() + "  - decompose: {num_cores: 3}\n")
    monkeypatch.chdir(tmp_path)
    assert _statuses(capsys, "r.yaml") == ["ran", "ran"]
    for spelling in (recipe, tmp_path / "work" / ".." / "r.yaml", "./r.yaml"):
        assert _statuses(capsys, spelling, "--dry-run") == ["skipped", "skipped"]
        assert _statuses(capsys, spelling) == ["skipped", "skipped"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert _statuses(capsys, recipe, "--dry-run") == ["skipped", "skipped"]
    assert _statuses(capsys, recipe, "-w", tmp_path / "work") == ["skipped", "skipped"]


def test_a_stage_that_reruns_reruns_the_later_ones_in_the_plan_too(bert, tmp_path, capsys):
    recipe = _recipe(tmp_path, bert, DECOMPOSE + "  - merge: {}\n")
    assert _statuses(capsys, recipe) == ["ran", "ran"]
    recipe.write_text(recipe.read_text().replace("num_cores: 3", "num_cores: 4"))
    assert _statuses(capsys, recipe, "--dry-run") == ["planned", "planned"]
    assert _statuses(capsys, recipe) == ["ran", "ran"]
