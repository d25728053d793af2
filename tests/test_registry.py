"""One list of stages (`stages.registry`): the public API, recipes and the CLI follow it; the
shared CLI flags are declared once (`cli.options.shared_flags`)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import typer

import mposurgeon
import mposurgeon.mpo
from mposurgeon.cli import options as opt
from mposurgeon.cli.app import build_app
from mposurgeon.errors import UsageError
from mposurgeon.stages.common import InputOptions, StageOptions
from mposurgeon.stages.recipe import options_class
from mposurgeon.stages.registry import BY_NAME, STAGES
from tests.cli_runner import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_cli_commands_are_the_stages_then_run() -> None:
    commands = typer.main.get_command(build_app()).commands  # type: ignore[attr-defined]
    assert list(commands) == [*(s.name for s in STAGES), "run", "export-peft"]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_resolves_everywhere(stage) -> None:
    function = stage.function()
    assert getattr(mposurgeon, stage.function_name) is function
    assert stage.function_name in mposurgeon.__all__
    if stage.options is not None:
        cls = stage.options_class()
        assert issubclass(cls, InputOptions)
        assert issubclass(cls, StageOptions) == stage.writes  # output options iff it writes
        assert options_class(stage.name) is cls
        assert getattr(mposurgeon, stage.options) is cls
        assert stage.options in mposurgeon.__all__
        assert inspect.signature(function).parameters["options"]


def test_every_public_name_resolves() -> None:
    for name in mposurgeon.__all__:
        assert getattr(mposurgeon, name) is not None, name
    assert mposurgeon.load_model.__module__ == "mposurgeon.artifact.load"
    for name in mposurgeon.mpo.__all__:
        assert getattr(mposurgeon.mpo, name).__module__ == mposurgeon.mpo._LAZY[name], name


@pytest.mark.parametrize("package", [mposurgeon, mposurgeon.mpo], ids=lambda p: p.__name__)
def test_type_checking_imports_mirror_the_lazy_names(package) -> None:
    """Type checkers read the `if TYPE_CHECKING:` imports; they must name what `_LAZY` does."""
    tree = ast.parse(Path(package.__file__).read_text(encoding="utf-8"))
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    mirrored = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert mirrored == package._LAZY


def test_eval_is_public_as_evaluate_without_shadowing_the_builtin() -> None:
    assert BY_NAME["eval"].function_name == "evaluate" and "evaluate" in mposurgeon.__all__
    assert "eval" not in mposurgeon.__all__ and not hasattr(mposurgeon, "eval")
    names: dict[str, object] = {}
    exec("from mposurgeon import *", names)
    assert "eval" not in names and names["evaluate"] is mposurgeon.evaluate
    assert [s.name for s in STAGES if not s.writes] == ["eval", "inspect"]


def test_a_recipe_knows_exactly_the_registered_stages(tmp_path: Path) -> None:
    assert set(BY_NAME) == {
        "decompose", "truncate", "prune", "moe", "select", "train", "eval", "merge", "inspect"
    }  # fmt: skip
    with pytest.raises(TypeError, match="no options class"):
        BY_NAME["inspect"].options_class()  # writes nothing
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: m\nstages:\n  - inspct: {}\n", encoding="utf-8")
    with pytest.raises(UsageError, match="unknown stage 'inspct'.*inspect"):
        mposurgeon.run_recipe(recipe)


def test_shared_flags_are_listed_with_their_help(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    expected = {
        "decompose": opt.STAGE_FLAGS,
        "select": opt.STAGE_FLAGS,
        "truncate": opt.ARTIFACT_STAGE_FLAGS,
        "merge": opt.ARTIFACT_STAGE_FLAGS,
        "inspect": (*opt.HUB_FLAGS, "no_verify", "json_out"),
        "eval": (*opt.HUB_FLAGS, "no_verify", "json_out", "quiet"),
        "run": ("workdir", "json_out", "quiet"),
    }
    for command, names in expected.items():
        result = run_cli(capsys, command, "--help")
        assert result.code == 0, result
        for name in names:
            info = opt._FLAG_TYPES[name].__metadata__[0]
            flag = info.default.split("/")[0]  # --offline/--online
            line = next(x for x in result.out.splitlines() if f" {flag} " in x)
            assert info.help in " ".join(line.split()), (command, name)


def test_shared_flags_hands_the_command_one_stageflags_object() -> None:
    seen: list[opt.StageFlags] = []

    @opt.shared_flags("output", "quiet")
    def command(model: str, *, flags: opt.StageFlags) -> None:
        seen.append(flags)

    assert list(inspect.signature(command).parameters) == ["model", "output", "quiet"]
    command(model="m", output=Path("o"), quiet=True)
    assert seen == [opt.StageFlags(output=Path("o"), quiet=True)]
    assert seen[0].no_progress and seen[0].stage_kwargs()["verify_checksums"] is True

    def no_flags(model: str) -> None: ...

    with pytest.raises(TypeError, match="flags"):
        opt.shared_flags("output")(no_flags)
    with pytest.raises(ValueError, match="not shared flags"):
        opt.shared_flags("outptu")
