"""Random mutations of real manifests and recipes never cause an internal error.

Property-based (hypothesis): a valid artifact's `mposurgeon.json` or a valid recipe is
mutated at a random place (a value replaced by garbage, a key deleted or added), then the
commands that read it run in-process. Whatever the mutation, each command either works or
fails with one line `error: ...` and a documented exit code (1-4); it never reports an
internal error, never modifies its input, and writes nothing outside its output directory.
Bounded to a few dozen examples per property so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli_runner import CliResult, run_cli

#: Exit codes a command may end with on bad input (DESIGN.md): error, usage, verify, not found.
ERROR_CODES = {1, 2, 3, 4}

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Garbage of every JSON kind, and strings a careless or hostile file might hold.
_texts = st.sampled_from(
    ["", ".", "..", "../../..", "/abs/dir", "x/../../y", "a\x00b", "int8", "conv1d", "é" * 3]
) | st.text(max_size=12)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _texts
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (tuple of keys and indices) to a value inside `data`, `data` included."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, (*prefix, i))


@st.composite
def _mutated(draw: st.DrawFn, data: Any) -> Any:
    """`data` (JSON-like) with one random place replaced, deleted, or given an extra key."""
    data = json.loads(json.dumps(data))
    paths = [p for p in _paths(data) if p]
    path = draw(st.sampled_from(paths))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(_texts)] = draw(_values)
    else:
        parent.append(draw(_values))
    return data


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _check_outcome(result: CliResult, what: str, status_lines: bool = False) -> None:
    """Success, or one `error:` line with a documented exit code; never an internal error.
    With `status_lines` (`run` reports each stage's status on stderr), those may come first."""
    assert "internal error" not in result.err, (what, result.err)
    assert "Traceback" not in result.err, (what, result.err)
    if result.code == 0:
        return
    assert result.code in ERROR_CODES, (what, result)
    lines = [line for line in result.err.splitlines() if line.strip()]
    if status_lines:
        lines = [line for line in lines if not re.fullmatch(r"stage \d+ \(.*\): \w+", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.err)


@pytest.fixture(scope="module")
def artifact_template(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real decomposed artifact (tiny BERT, FFN_1, 3 cores), made once per module."""
    from mposurgeon.stages.decompose import decompose

    out = tmp_path_factory.mktemp("mutations") / "art"
    decompose(tiny_model_dir("bert"), output=out, layers=["FFN_1"], num_cores=3)
    return out


@SETTINGS
@given(data=st.data())
def test_mutated_manifest_never_crashes(artifact_template: Path, capsys, data: st.DataObject):
    manifest = json.loads((artifact_template / "mposurgeon.json").read_text())
    mutated = data.draw(_mutated(manifest), label="manifest")
    command = data.draw(st.sampled_from(["inspect", "truncate", "merge", "decompose"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        art = root / "art"
        shutil.copytree(artifact_template, art)
        (art / "mposurgeon.json").write_text(json.dumps(mutated), encoding="utf-8")
        before = _snapshot(art)
        out = root / "out"
        args: list[object] = {
            "inspect": ["inspect", art, "--json"],
            "truncate": ["truncate", art, "--max-bond", "2", "-o", out, "-q"],
            "merge": ["merge", art, "-o", out, "-q"],
            "decompose": ["decompose", art, "--layers", "FFN_2", "-n", "3", "-o", out, "-q"],
        }[command]
        result = run_cli(capsys, *args)
        _check_outcome(result, f"{command} of a manifest mutated to {mutated!r}"[:2000])
        assert _snapshot(art) == before, "the input artifact was modified"
        written = {p.name for p in root.iterdir()}
        assert written <= {"art", "out"}, written  # nothing outside the outputs


_RECIPE = {
    "version": 1,
    "model": "MODEL",
    "workdir": "work",
    "stages": [
        {"decompose": {"layers": ["FFN_1"], "num_cores": 3}, "expect": {"max_rel_error": 1e-5}},
        {"name": "squeeze", "truncate": {"max_bond": 2}},
        {"inspect": {}},
        {"merge": {"verify": True}, "expect": {"max_merge_diff": 1e-4}},
    ],
}


@SETTINGS
@given(data=st.data())
def test_mutated_recipe_never_crashes(tiny_model_dir, capsys, data: st.DataObject) -> None:
    recipe = json.loads(json.dumps(_RECIPE).replace("MODEL", str(tiny_model_dir("bert"))))
    mutated = data.draw(_mutated(recipe), label="recipe")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        path = root / "r.yaml"
        try:
            text = yaml.safe_dump(mutated, allow_unicode=True)
        except yaml.YAMLError:
            text = json.dumps(mutated)
        path.write_text(text, encoding="utf-8")
        result = run_cli(capsys, "run", path, "--dry-run", "--json")
        _check_outcome(result, f"run --dry-run of {mutated!r}"[:2000])
        assert {p.name for p in root.iterdir()} == {"r.yaml"}, "a dry run wrote files"
        assert [p.name for p in Path(tmp).iterdir()] == ["project"]


@settings(SETTINGS, max_examples=15)
@given(data=st.data())
def test_mutated_recipe_runs_or_fails_cleanly(tiny_model_dir, capsys, data: st.DataObject) -> None:
    """The mutated recipe really runs: stages either work or fail in one line, and nothing is
    written outside the recipe's own workdir (the recipe file's directory holds nothing else)."""
    recipe = json.loads(json.dumps(_RECIPE).replace("MODEL", str(tiny_model_dir("bert"))))
    stages = data.draw(_mutated({"stages": recipe["stages"]}), label="stages")
    mutated = {**recipe, **stages}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        path = root / "r.yaml"
        path.write_text(json.dumps(mutated), encoding="utf-8")  # JSON is YAML
        result = run_cli(capsys, "run", path, "-q")
        _check_outcome(result, f"run of {mutated!r}"[:2000], status_lines=True)
        assert {p.name for p in root.iterdir()} <= {"r.yaml", "work"}
        assert [p.name for p in Path(tmp).iterdir()] == ["project"]
        work = root / "work"
        if work.exists():
            assert {p.name for p in work.iterdir()} <= {"r"}, "wrote outside <workdir>/<recipe>"
