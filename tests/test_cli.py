"""The command contract: exit codes, one-line errors, JSON output, nothing lost on bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer

from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.cli.app import build_app
from mposurgeon.cli.entry import COMMANDS
from tests.cli_runner import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.fixture
def bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert")


@pytest.fixture
def artifact(bert: Path, tmp_path: Path, capsys) -> Path:
    out = tmp_path / "art"
    result = run_cli(capsys, "decompose", bert, "-o", out, "--layers", "FFN_1", "-n", "3", "-q")
    assert result.code == 0, result
    return out


# --- success paths -------------------------------------------------------------------------


def test_decompose_json_is_one_object_on_stdout(bert: Path, tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "decompose", bert, "-o", tmp_path / "o", "-n", "3", "--json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["output"] == str(tmp_path / "o")
    assert len(data["modules"]) == len(read_manifest(tmp_path / "o").modules)


def test_dry_run_plans_without_writing(bert: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    result = run_cli(
        capsys, "decompose", bert, "-o", out, "--layers", "FFN_1,attention", "--dry-run", "--json"
    )
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["dry_run"] is True and data["output"] is None
    # planned inner bonds (no boundary 1s): one fewer than the cores
    assert all(
        m["rel_error"] is None and len(m["bonds"]) == len(m["modes"][0]) - 1
        for m in data["modules"]
    )
    assert {m["group"] for m in data["modules"]} == {"FFN_1", "attention"}
    assert not out.exists()


def test_versioned_outputs_never_overwrite(bert: Path, tmp_path: Path, capsys) -> None:
    for _ in range(2):
        result = run_cli(capsys, "decompose", bert, "-w", tmp_path, "--layers", "FFN_1", "-q")
        assert result.code == 0, result
    name = bert.name
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["v1-decompose", "v2-decompose"]
    merged = run_cli(capsys, "merge", tmp_path / name / "v2-decompose", "-w", tmp_path, "-q")
    assert merged.code == 0, merged
    assert (tmp_path / name / "v3-merge" / "model.safetensors").exists()


def test_inspect_table_and_json(artifact: Path, capsys) -> None:
    table = run_cli(capsys, "inspect", artifact)
    assert table.code == 0 and "MPO modules: 2" in table.out and "lineage 1: decompose" in table.out
    data = json.loads(run_cli(capsys, "inspect", artifact, "--json").out)
    assert data["kind"] == "artifact" and data["stage"] == "decompose"


def test_inspect_hf_dir_and_single_safetensors_file(bert: Path, capsys) -> None:
    hf = json.loads(run_cli(capsys, "inspect", bert, "--json").out)
    assert hf["kind"] == "hf" and hf["format_version"] is None
    assert all(m["kind"] == "dense" for m in hf["modules"])
    single = json.loads(run_cli(capsys, "inspect", bert / "model.safetensors", "--json").out)
    assert single["kind"] == "safetensors" and single["params"]["total"] == hf["params"]["total"]


def test_decompose_artifact_adds_modules_and_keeps_lineage(artifact: Path, tmp_path, capsys):
    out = tmp_path / "more"
    result = run_cli(capsys, "decompose", artifact, "-o", out, "--layers", "FFN_1,FFN_2", "-q")
    assert result.code == 0, result
    manifest = read_manifest(out)
    assert len(manifest.modules) == 4 and len(manifest.lineage) == 2
    assert manifest.parent is not None and manifest.parent.path == str(artifact)


def test_hub_alias_resolves_in_offline_cache(bert: Path, tmp_path: Path, capsys, monkeypatch):
    # The live hub cannot be reached from tests: a hand-built HF cache stands in for it.
    cache = tmp_path / "hub"
    repo = cache / "models--google-bert--bert-base-uncased"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(bert, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli(
        capsys,
        "decompose",
        "bert-base",
        "--layers",
        "FFN_1,attention",
        "--cache-dir",
        cache,
        "-w",
        tmp_path / "work",
        "-q",
    )
    assert result.code == 0, result
    out = tmp_path / "work" / "bert-base-uncased" / "v1-decompose"
    manifest = read_manifest(out)
    assert manifest.base.model_id == "google-bert/bert-base-uncased"
    assert manifest.base.revision == commit


def _help_in_a_fresh_process(commands: list[str], then: str) -> str:
    """stdout of a new interpreter that runs `mposurgeon --help` (with "" in `commands`) and
    `mposurgeon C --help` for each other C, each exiting 0, then the statement `then`."""
    code = (
        "import sys\n"
        "from mposurgeon.cli.app import main\n"
        f"for command in {commands!r}:\n"
        "    try:\n        main([command, '--help'] if command else ['--help'])\n"
        "    except SystemExit as e:\n        assert e.code == 0\n"
        f"{then}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_has_examples_and_does_not_import_torch() -> None:
    commands = ["", "decompose", "truncate", "select", "train", "eval", "merge", "inspect", "run"]
    then = "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    out = _help_in_a_fresh_process(commands, then)
    assert out.strip().endswith("NO-TORCH")
    assert out.count("Example") >= 9  # the app's and one per command


def test_a_command_runs_without_the_other_commands_modules() -> None:
    """`main` builds the app with the command it runs alone (`build_app`): the other command
    modules are not imported, and the command's help and usage read as in the full app."""
    others = ("train", "decompose", "run", "export_peft", "eval", "select")
    then = f"print([m for m in {others!r} if 'mposurgeon.cli.' + m in sys.modules])"
    out = _help_in_a_fresh_process(["merge"], then)
    assert "Usage: mposurgeon merge [OPTIONS]" in out
    assert out.strip().splitlines()[-1] == "[]"
    full = typer.main.get_command(build_app()).commands  # type: ignore[attr-defined]
    alone = typer.main.get_command(build_app("merge")).commands  # type: ignore[attr-defined]
    assert set(full) == set(COMMANDS) and list(alone) == ["merge"]


# --- bad input: one line, right exit code, nothing lost ---------------------------------------


def test_missing_path(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "decompose", tmp_path / "nope", "-o", tmp_path / "o")
    assert_one_line_error(result, 4, "nope")
    assert not (tmp_path / "o").exists()


def test_hub_id_not_in_offline_cache(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli(capsys, "decompose", "acme/missing-model", "--cache-dir", tmp_path)
    assert_one_line_error(result, 4, "acme/missing-model", "hf download")


def test_unknown_group_lists_valid_groups(bert: Path, capsys, tmp_path) -> None:
    result = run_cli(capsys, "decompose", bert, "--layers", "FFN_3", "-o", tmp_path / "o")
    assert_one_line_error(result, 2, "FFN_3", "FFN_1", "attention")


def test_group_matching_nothing_lists_modules(bert: Path, capsys, tmp_path) -> None:
    result = run_cli(capsys, "decompose", bert, "--layers", "lm_head", "-o", tmp_path / "o")
    assert_one_line_error(result, 2, "lm_head", "intermediate.dense")


def test_non_factorizable_explicit_modes(bert: Path, capsys, tmp_path) -> None:
    result = run_cli(
        capsys,
        "decompose",
        bert,
        "--layers",
        "FFN_1",
        "--modes",
        "4,4,4x4,4,4",
        "-o",
        tmp_path / "o",
    )
    assert_one_line_error(result, 2, "4,4,4")
    assert not (tmp_path / "o").exists()


def test_option_out_of_range_is_a_usage_error(bert: Path, capsys, tmp_path) -> None:
    result = run_cli(capsys, "decompose", bert, "--num-cores", "1", "-o", tmp_path / "o")
    assert_one_line_error(result, 2, "num-cores")


def test_truncated_safetensors(bert: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bert, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = _snapshot(broken)
    result = run_cli(capsys, "decompose", broken, "-o", tmp_path / "o")
    assert_one_line_error(result, 1, "model.safetensors")
    assert not (tmp_path / "o").exists() and _snapshot(broken) == before


def test_corrupted_safetensors_header(bert: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bert, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"
    (broken / "model.safetensors").write_bytes(bytes(data))
    assert_one_line_error(run_cli(capsys, "inspect", broken), 1, "model.safetensors")


def test_tampered_artifact_is_refused(artifact: Path, tmp_path: Path, capsys) -> None:
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run_cli(capsys, "merge", artifact, "-o", tmp_path / "m")
    assert_one_line_error(result, 1, "model.safetensors", "checksum")
    assert not (tmp_path / "m").exists()
    # --no-verify skips hashing (for huge files the user trusts)
    assert run_cli(capsys, "merge", artifact, "-o", tmp_path / "m", "--no-verify", "-q").code == 0


def test_unreadable_artifact_reports_the_checksum(artifact: Path, tmp_path: Path, capsys) -> None:
    """Hashing runs alongside the work; when reading fails on a damaged file, the checksum
    error (which explains it) is what the user sees."""
    weights = artifact / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    for command in (["merge"], ["truncate", "--max-bond", "2"], ["decompose", "--layers", "FFN_2"]):
        result = run_cli(capsys, command[0], artifact, *command[1:], "-o", tmp_path / "o")
        assert_one_line_error(result, 1, "model.safetensors", "checksum")
        assert not (tmp_path / "o").exists()


def test_dry_runs_verify_the_artifact(artifact: Path, capsys) -> None:
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    for command in (["truncate", "--max-bond", "2"], ["decompose", "--layers", "FFN_2"]):
        result = run_cli(capsys, command[0], artifact, *command[1:], "--dry-run")
        assert_one_line_error(result, 1, "model.safetensors", "checksum")


def test_newer_format_version_is_refused(artifact: Path, capsys) -> None:
    path = artifact / "mposurgeon.json"
    data = json.loads(path.read_text())
    data["format_version"] = 7
    path.write_text(json.dumps(data))
    assert_one_line_error(run_cli(capsys, "inspect", artifact), 1, "format_version 7")


def test_existing_nonempty_output_is_untouched(bert: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli(capsys, "decompose", bert, "-o", out)
    assert_one_line_error(result, 1, "taken", "--overwrite")
    assert _snapshot(out) == {"precious.txt": b"keep me"}
    assert run_cli(capsys, "decompose", bert, "-o", out, "--overwrite", "-q").code == 0
    assert not (out / "precious.txt").exists() and (out / "mposurgeon.json").exists()


def test_output_equal_to_input_is_refused(artifact: Path, capsys) -> None:
    before = _snapshot(artifact)
    result = run_cli(
        capsys, "decompose", artifact, "-o", artifact, "--overwrite", "--layers", "FFN_2"
    )
    assert_one_line_error(result, 1)
    assert _snapshot(artifact) == before


def test_merge_of_a_plain_checkpoint_is_refused(bert: Path, tmp_path: Path, capsys) -> None:
    assert_one_line_error(
        run_cli(capsys, "merge", bert, "-o", tmp_path / "m"), 2, "not a mposurgeon artifact"
    )


def test_merge_verify_failure_exits_3_and_writes_nothing(artifact, tmp_path, capsys, monkeypatch):
    import mposurgeon.stages.merge as merge_stage

    real = merge_stage.dense_tensors

    def perturbed(*args, **kwargs):  # a merge bug: noise (a constant would vanish after LayerNorm)
        noise = torch.Generator().manual_seed(0)
        return {
            k: w + 0.5 * torch.randn(w.shape, generator=noise)
            for k, w in real(*args, **kwargs).items()
        }

    monkeypatch.setattr(merge_stage, "dense_tensors", perturbed)
    result = run_cli(capsys, "merge", artifact, "-o", tmp_path / "m", "--verify")
    assert_one_line_error(result, 3, "differ")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_debug_shows_traceback(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "decompose", tmp_path / "nope", "--debug")
    assert result.code == 4 and "Traceback" in result.err


def test_sigint_during_decompose_leaves_nothing(minilm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mposurgeon",
            "decompose",
            str(minilm_dir),
            "-o",
            str(out),
            "--layers",
            "FFN_1,FFN_2,attention,embeddings",
            "--dtype",
            "float64",
            "--max-shard-size",
            "1MB",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".out.tmp*/*.safetensors")):  # mid-write: shards on disk
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
