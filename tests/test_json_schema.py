"""One `--json` schema for every command (issue 16 item 6): each command run with `--json` on
tiny models prints one object that validates against its model in `cli/json_schema.py`,
starts with `schema_version` 1 and the command's name, has the same `params` keys as every
other command, absolute resolved paths (the commands are given relative ones), and MPO bonds
without the boundary 1s, as the tables show them. A failure object carries the same header.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mposurgeon.cli.app import main
from mposurgeon.cli.entry import COMMANDS, command_name
from mposurgeon.cli.json_schema import SCHEMAS, SELECTION_KEYS, FailureJson, Params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
#: Keys whose string values are paths wherever they appear in an object.
PATH_KEYS = {"input", "output", "path", "plot", "recipe", "workdir", "csv", "png"}


def _cli(*args: object) -> tuple[int, str, str]:
    """`mposurgeon ARGS...` in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as exit_info,
    ):
        main([str(a) for a in args])
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


def _json(*args: object) -> dict[str, Any]:
    """The one JSON object of a successful `mposurgeon ARGS... --json`."""
    code, out, err = _cli(*args, "--json")
    assert code == 0, (args, out, err)
    return json.loads(out)


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as the working directory (the commands get relative paths)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of the commands, reached through a symbolic link: a path that
    is absolute but not resolved until `Path.resolve()`."""
    real = tmp_path_factory.mktemp("json-schema")
    link = real.parent / f"{real.name}-link"
    link.symlink_to(real, target_is_directory=True)
    return link


@pytest.fixture(scope="module")
def outputs(
    work: Path, tiny_classifier_dir: Callable[[str], Path], one_torch_thread: None
) -> dict[str, dict[str, Any]]:
    """Every command's `--json` object (dry runs too), keyed by a short label, run in `work`
    on relative paths."""
    import shutil

    shutil.copytree(tiny_classifier_dir("bert"), work / "tiny")
    recipe = work / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: tiny\nworkdir: runs\nstages:\n"
        "  - decompose: {layers: FFN_1, num_cores: 3}\n  - inspect: {}\n",
        encoding="utf-8",
    )
    steps = ("--data", TRAIN, "--max-steps", "1", "--batch-size", "8", "-q")
    got: dict[str, dict[str, Any]] = {}
    with _inside(work):
        got["decompose-dry"] = _json("decompose", "tiny", "-o", "dec", "--dry-run")
        got["decompose"] = _json("decompose", "tiny", "-o", "dec", "-q")
        got["truncate-dry"] = _json("truncate", "dec", "-o", "tr", "--max-bond", "2", "--dry-run")
        got["truncate"] = _json("truncate", "dec", "-o", "tr", "--max-bond", "2", "-q")
        got["select"] = _json(
            "select", "tiny", "-o", "sel", "--top-n", "1", "--method", "magnitude", "-q"
        )
        got["train-dry"] = _json(
            "train", "tiny", "-o", "lora", "--method", "lora", "--dry-run", *steps
        )
        got["train"] = _json("train", "dec", "-o", "trained", "--method", "lightweight", *steps)
        got["eval"] = _json("eval", "trained", "--data", EVAL, "-q")
        got["merge"] = _json("merge", "dec", "-o", work / "merged", "-q")  # through the link
        got["inspect"] = _json("inspect", work / "dec")
        got["inspect-hf"] = _json("inspect", "merged")
        got["moe-dry"] = _json("moe", "tiny", "-o", "moe", "--experts", "2", "--dry-run")
        got["moe"] = _json("moe", "tiny", "-o", "moe", "--experts", "2", "-q")
        got["inspect-moe"] = _json("inspect", "moe")
        got["prune-dry"] = _json("prune", "tiny", "-o", "pruned", "--ffn-neurons", "8", "--dry-run")
        got["prune"] = _json("prune", "tiny", "-o", "pruned", "--ffn-neurons", "8", "-q")
        got["lora"] = _json("train", "tiny", "-o", "lora", "--method", "lora", *steps)
        got["export-peft"] = _json("export-peft", "lora", "-o", "adapter", "-q")
        got["run"] = _json("run", "r.yaml", "-q")
    return got


def _walk(data: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON object, nested ones too, but for an artifact's
    `lineage`: each stage's options as given then (an `output` relative to where it ran)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield k, v
            if k != "lineage":
                yield from _walk(v, k)
    elif isinstance(data, list):
        for v in data:
            yield from _walk(v, key)


def test_every_command_is_covered(outputs: dict[str, dict[str, Any]]) -> None:
    import typer

    from mposurgeon.cli.app import build_app

    registered = set(typer.main.get_command(build_app()).commands)  # type: ignore[attr-defined]
    assert registered == set(COMMANDS) == set(SCHEMAS)
    assert {o["command"] for o in outputs.values()} == set(COMMANDS)


@pytest.mark.parametrize(
    "label",
    [
        "decompose-dry",
        "decompose",
        "truncate-dry",
        "truncate",
        "select",
        "train-dry",
        "train",
        "eval",
        "merge",
        "inspect",
        "inspect-hf",
        "moe-dry",
        "moe",
        "inspect-moe",
        "prune-dry",
        "prune",
        "lora",
        "export-peft",
        "run",
    ],
)
def test_object_fits_its_schema(outputs: dict[str, dict[str, Any]], label: str) -> None:
    data = outputs[label]
    assert list(data)[:4] == ["schema_version", "command", "ok", "error"]
    assert data["schema_version"] == 1 and data["ok"] is True and data["error"] is None
    schema = SCHEMAS[data["command"]]
    # validating again changes nothing: every key is declared, every path already resolved
    assert schema.model_validate(data).model_dump(mode="json") == data
    assert "params" in data
    if data["command"] in ("eval", "export-peft", "run"):
        assert data["params"] is None
    else:
        assert list(data["params"]) == list(Params.model_fields)


def test_paths_are_absolute_and_resolved(outputs: dict[str, dict[str, Any]], work: Path) -> None:
    real = str(work.resolve())
    checked = 0
    for label, data in outputs.items():
        for key, value in _walk(data):
            if key in PATH_KEYS and isinstance(value, str):
                assert value == str(Path(value).resolve()), (label, key, value)
                checked += 1
        shown = json.dumps({k: v for k, v in data.items() if k != "lineage"})
        assert str(work) not in shown, label  # the link, never followed
    assert outputs["decompose"]["input"] == f"{real}/tiny"
    assert outputs["decompose"]["output"] == f"{real}/dec"
    assert outputs["truncate"]["input"] == f"{real}/dec"
    assert outputs["eval"]["data"]["path"] == str(EVAL)
    assert outputs["inspect"]["input"] == f"{real}/dec"
    assert outputs["merge"]["output"] == f"{real}/merged"
    run = outputs["run"]
    assert run["recipe"] == f"{real}/r.yaml" and run["workdir"] == f"{real}/runs"
    assert run["stages"][0]["input"] == f"{real}/tiny"
    assert run["stages"][1]["input"] == run["stages"][0]["output"]
    assert checked > 30  # the walk did find the paths


def test_params_have_one_meaning(outputs: dict[str, dict[str, Any]]) -> None:
    """Counts agree between commands: a dry run plans what the real run writes, `before` is
    the input's `total` as inspect counts it, trainable as train recorded it."""
    p = {label: data["params"] for label, data in outputs.items()}
    tiny = p["select"]["before"]
    assert tiny == p["select"]["total"] and p["inspect-hf"]["mpo"] == 0
    for label in ("decompose", "moe", "prune", "lora"):
        assert p[label]["before"] == tiny, label
    for label in ("decompose", "truncate", "prune"):
        planned = {k: v for k, v in p[f"{label}-dry"].items() if k not in ("trainable",)}
        assert planned == {k: v for k, v in p[label].items() if k != "trainable"}, label
    assert p["decompose"] == {**p["inspect"], "before": tiny}
    assert p["truncate"]["before"] == p["decompose"]["total"] == p["merge"]["before"]
    assert p["merge"]["total"] == p["inspect-hf"]["total"]
    dec = outputs["decompose"]
    assert (
        dec["decomposed"]["mpo"]
        == p["decompose"]["mpo"]
        == sum(m["params"] for m in dec["modules"])
    )
    assert p["decompose"]["mpo_ratio"] == p["decompose"]["mpo"] / p["decompose"]["dense_equivalent"]
    assert p["decompose"]["dense"] == p["decompose"]["total"] - p["decompose"]["mpo"]
    tr = outputs["truncate"]["truncation"]
    assert (
        p["truncate"]["total"] - p["truncate"]["before"] == tr["mpo_after"] - tr["mpo_before"] < 0
    )
    metrics = outputs["train"]["metrics"]
    assert p["train"]["trainable"] == metrics["trainable_params"]
    assert p["train"]["trainable_head"] == metrics["trainable_head"] > 0
    assert p["train"]["before"] == p["decompose"]["total"]
    lora, dry = outputs["lora"]["metrics"], p["train-dry"]
    assert (dry["total"], dry["trainable"]) == (lora["total_params"], lora["trainable_params"])
    assert dry["before"] == tiny and p["lora"]["trainable"] == lora["trainable_params"]
    assert p["moe"]["total"] == p["inspect-moe"]["total"] and p["moe-dry"]["total"] is None
    assert outputs["moe"]["expert_params"] == outputs["inspect-moe"]["experts"]["expert_params"]
    assert p["prune"]["total"] < p["prune"]["before"] == tiny


def _table_bonds(text: str, name: str) -> str:
    """The bonds cell of module `name` in a table (the cell after the modes cell `a·b x c·d`)."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0] == name:
            modes = next(i for i, c in enumerate(cells) if " x " in c)
            return cells[modes + 1]
    raise AssertionError(f"no table row for {name}:\n{text}")


def test_bonds_are_the_inner_ones_as_in_the_tables(
    outputs: dict[str, dict[str, Any]], work: Path
) -> None:
    with _inside(work):
        code, table, err = _cli("inspect", "dec")
    assert code == 0, err
    modules = [m for m in outputs["inspect"]["modules"] if m["kind"] == "mpo"]
    assert modules
    for m in modules:
        assert len(m["bonds"]) == len(m["modes"][0]) - 1
        assert _table_bonds(table, m["name"]) == ",".join(map(str, m["bonds"])), m["name"]
    by_name = {m["name"]: m for m in outputs["decompose"]["modules"]}
    assert {n: m["bonds"] for n, m in by_name.items()} == {m["name"]: m["bonds"] for m in modules}
    for m in outputs["truncate"]["modules"]:
        assert m["bonds_before"] == by_name[m["name"]]["bonds"]
        assert len(m["bonds"]) == len(m["modes"][0]) - 1 and max(m["bonds"]) <= 2


def test_inner_bonds_are_checked_by_the_schema(outputs: dict[str, dict[str, Any]]) -> None:
    data = outputs["decompose"]
    row = data["modules"][0]
    full = [1, *row["bonds"], 1]
    bad = {**data, "modules": [{**row, "bonds": full}, *data["modules"][1:]]}
    with pytest.raises(ValueError, match="inner bonds"):
        SCHEMAS["decompose"].model_validate(bad)


#: A command line per command that fails because its input does not exist.
MISSING = {
    "decompose": ["decompose", "no-such-model"],
    "truncate": ["truncate", "no-such-model", "--max-bond", "2"],
    "select": ["select", "no-such-model", "--top-n", "1", "--method", "magnitude"],
    "train": ["train", "no-such-model", "--data", TRAIN],
    "eval": ["eval", "no-such-model", "--data", EVAL],
    "merge": ["merge", "no-such-model"],
    "inspect": ["inspect", "no-such-model"],
    "moe": ["moe", "no-such-model"],
    "prune": ["prune", "no-such-model", "--sparsity", "0.5"],
    "export-peft": ["export-peft", "no-such-model", "-o", "out"],
    "run": ["run", "no-such-recipe.yaml"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_failure_object_names_its_command(command: str, tmp_path: Path) -> None:
    with _inside(tmp_path):
        code, out, err = _cli(*MISSING[command], "--json")
    assert code in (2, 4), (out, err)
    data = json.loads(out)
    assert FailureJson.model_validate(data).model_dump(mode="json") == data
    assert data["schema_version"] == 1 and data["command"] == command
    assert data["ok"] is False and data["error"]["exit_code"] == code
    assert data["error"]["message"] in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_and_unknown_commands(tmp_path: Path) -> None:
    code, out, _ = _cli("truncate", "--json")  # no ARTIFACT
    assert code == 2 and json.loads(out)["command"] == "truncate"
    code, out, _ = _cli("--debug", "decompos", "x", "--json")
    data = json.loads(out)
    assert code == 2 and data["command"] is None and data["schema_version"] == 1
    assert command_name(["--debug", "run", "r.yaml"]) == "run"
    assert command_name(["--version"]) is None


def test_select_reports_every_key_of_the_selection_record() -> None:
    from mposurgeon.artifact.manifest import SelectionRecord

    assert set(SELECTION_KEYS) == set(SelectionRecord.model_fields)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_schema_is_documented(command: str) -> None:
    schema = SCHEMAS[command].model_json_schema()
    assert schema["properties"]["schema_version"]["const"] == 1
    assert schema["properties"]["command"]["const"] == command
    params = Params.model_json_schema()["properties"]
    assert all(field.get("description") for field in params.values())
