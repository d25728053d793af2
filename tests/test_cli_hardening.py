"""CLI hardening (issue 9): usage errors, early Ctrl-C, full disks, strict JSON, broken pipes."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mposurgeon.cli import render
from mposurgeon.errors import ModelNotFoundError
from tests.cli_runner import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _strict_json(text: str) -> Any:
    """Parse `text` as exactly one JSON value, refusing NaN and Infinity (invalid JSON)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert")


# --- 12: usage errors exit 2 with click's message ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [  # click's wording varies a little between versions
        (["--bogus"], ("No such option", "--bogus")),
        (["inspect", "x", "--bogus"], ("No such option", "--bogus", "mposurgeon inspect --help")),
        (["inspect"], ("Missing argument",)),
        (["nosuch"], ("No such command", "nosuch")),
        (["decompose", "x", "--layers"], ("Option '--layers' requires an argument",)),
        (["truncate", "x", "--max-bond", "abc"], ("Invalid value for '--max-bond'",)),
    ],
)
def test_usage_errors_exit_2_with_clicks_message(capsys, args: list[str], needles) -> None:
    result = run_cli(capsys, *args)
    line = assert_one_line_error(result, 2, *needles)
    assert "--help" in line  # the hint says where to look
    assert result.out == ""


def test_bare_mposurgeon_prints_help_and_exits_2(capsys) -> None:
    # click >= 8.2's convention for no_args_is_help: the help, and exit 2 (a usage error).
    result = run_cli(capsys)
    assert result.code == 2, result
    assert "Usage: mposurgeon" in result.out + result.err
    assert "decompose" in result.out + result.err
    assert "error" not in (result.out + result.err).lower().split("usage")[0]


def test_usage_error_with_json_prints_one_error_object(capsys) -> None:
    result = run_cli(capsys, "inspect", "x", "--json", "--bogus")
    assert result.code == 2, result
    data = _strict_json(result.out)
    assert data["ok"] is False
    assert data["error"]["exit_code"] == 2 and data["error"]["type"] == "NoSuchOption"
    assert "No such option" in data["error"]["message"] and "--bogus" in data["error"]["message"]


# --- 13: Ctrl-C while the CLI is still importing ------------------------------------------------


# What the console script does (`from mposurgeon.cli.entry import main; sys.exit(main())`),
# telling the test through a pipe once `main` has installed its SIGINT handler (its first
# `signal.signal` call writes "up"). Before that, a Ctrl-C lands in Python's own startup
# (`site`, ~50 ms), in `import mposurgeon` (~5 ms, `typing`) or between the script's statements:
# beyond the reach of any code of ours. (Writing "up" before calling `main` left a window of a
# few bytecodes that a loaded machine hit.)
_SCRIPT = """
import os, signal
from mposurgeon.cli.entry import main
install = signal.signal
def first(signum, handler):
    previous = install(signum, handler)
    signal.signal = install
    os.write({fd}, b'up')
    return previous
signal.signal = first
main()
"""


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
def test_early_sigint_never_prints_a_traceback(bert: Path, delay: float) -> None:
    up_read, up_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT.format(fd=up_write), "inspect", str(bert), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
        pass_fds=(up_write,),
    )
    os.close(up_write)
    assert os.read(up_read, 2) == b"up"
    os.close(up_read)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if proc.returncode == 0:  # finished before the signal arrived
        _strict_json(out)
        return
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "error: interrupted; no partial output was left behind", err
    data = _strict_json(out)
    assert data["schema_version"] == 1 and data["command"] == "inspect"
    error = data["error"]
    assert error["exit_code"] == 130 and error["type"] == "KeyboardInterrupt"


def test_console_script_is_the_entry_module() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'mposurgeon = "mposurgeon.cli.entry:main"' in text
    assert "from mposurgeon.cli.entry import main" in (REPO / "mposurgeon/__main__.py").read_text()


# --- 14: disk full, file-size limit, read-only output -----------------------------------------


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (errno.ENOSPC, "no space left on device writing"),
        (errno.EDQUOT, "disk quota exceeded writing"),
        (errno.EFBIG, "file size limit exceeded writing"),
        (errno.EROFS, ": read-only file system"),
        (errno.EACCES, "permission denied on"),
        (errno.EPERM, "operation not permitted on"),
    ],
)
def test_write_faults_are_one_line(bert: Path, tmp_path, capsys, monkeypatch, code, needle) -> None:
    # A full disk cannot be had in a test: the stage raises the OSError the kernel would give.
    target = tmp_path / "out" / "model.safetensors"

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr("mposurgeon.stages.inspect.inspect", fail)
    result = run_cli(capsys, "inspect", bert)
    assert_one_line_error(result, 1, needle, str(target))


def test_write_fault_found_in_the_exception_chain(bert: Path, tmp_path, capsys, monkeypatch):
    def fail(*args: object, **kwargs: object) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard"))
        except OSError as exc:
            raise RuntimeError("writer failed") from exc

    monkeypatch.setattr("mposurgeon.stages.inspect.inspect", fail)
    result = run_cli(capsys, "inspect", bert, "--json")
    assert_one_line_error(result, 1, "no space left on device writing", str(tmp_path / "shard"))
    assert _strict_json(result.out)["error"]["exit_code"] == 1


# --- 20: strictly valid JSON ---------------------------------------------------------------------


def test_print_json_writes_non_finite_floats_as_null(capsys) -> None:
    data = {
        "nan": math.nan,
        "inf": [math.inf, {"neg": -math.inf, "ok": 1.5}],
        "np32": np.float32("nan"),
        "np64": np.float64(0.25),
        "tuple": (math.inf, 2),
        "path": Path("/x"),
    }
    render.print_json(data)
    out = _strict_json(capsys.readouterr().out)
    assert out == {
        "nan": None,
        "inf": [None, {"neg": None, "ok": 1.5}],
        "np32": None,
        "np64": 0.25,
        "tuple": [None, 2],
        "path": "/x",
    }


def test_inspect_json_of_a_nan_error_is_valid_json(bert: Path, tmp_path, capsys) -> None:
    art = tmp_path / "art"
    assert run_cli(capsys, "decompose", bert, "-o", art, "--layers", "FFN_1", "-q").code == 0
    manifest = art / "mposurgeon.json"  # not among its own checksums
    text = json.loads(manifest.read_text())
    for module in text["modules"].values():
        module["rel_error"] = math.inf
    manifest.write_text(json.dumps(text))
    result = run_cli(capsys, "inspect", art, "--json", "--no-verify")
    if result.code != 0:  # a manifest with a non-finite error may be refused: still valid JSON
        assert _strict_json(result.out)["ok"] is False
        return
    data = _strict_json(result.out)
    assert all(m["rel_error"] is None for m in data["modules"] if m["kind"] == "mpo")


# --- 21: one JSON object on stdout when a --json command fails ------------------------------------


def test_json_error_object_for_a_user_error(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "inspect", tmp_path / "nope", "--json")
    assert_one_line_error(result, 4, "nope")
    data = _strict_json(result.out)
    assert data["ok"] is False and (data["schema_version"], data["command"]) == (1, "inspect")
    error = data["error"]
    assert error["exit_code"] == 4 and error["type"] == "ModelNotFoundError"
    assert "nope" in error["message"] and "hint" in error


def test_json_error_object_for_an_internal_error(bert: Path, capsys, monkeypatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("mposurgeon.stages.inspect.inspect", fail)
    result = run_cli(capsys, "inspect", bert, "--json")
    assert result.code == 1 and "internal error: RuntimeError: boom" in result.err
    data = _strict_json(result.out)
    assert data["error"]["type"] == "RuntimeError" and data["error"]["exit_code"] == 1


def test_no_json_error_object_without_json(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "inspect", tmp_path / "nope")
    assert result.code == 4 and result.out == ""


def test_a_command_that_printed_its_json_is_not_printed_twice(bert: Path, capsys, monkeypatch):
    # Stands in for `run --json`, which prints its own summary and then fails.
    real = render.print_json

    def print_then_fail(data: Any) -> None:
        real({"ok": False, "stages": []})
        raise ModelNotFoundError("stage 2 failed")

    monkeypatch.setattr("mposurgeon.cli.json_schema.print_json", print_then_fail)
    for _ in range(2):  # the flag is reset by every `main` call
        result = run_cli(capsys, "inspect", bert, "--json")
        assert result.code == 4
        assert _strict_json(result.out) == {"ok": False, "stages": []}


# --- broken pipe: `mposurgeon inspect ... | head -1` ---------------------------------------------


@pytest.mark.parametrize("json_out", [False, True])
def test_broken_pipe_exits_0_quietly(bert: Path, json_out: bool) -> None:
    args = [sys.executable, "-m", "mposurgeon", "inspect", str(bert), "--all"]
    proc = subprocess.Popen(
        args + (["--json"] if json_out else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away before the first line was written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


def test_inspect_of_a_verified_merge_shows_its_check(tiny_model_dir, tmp_path: Path, capsys):
    """A merge artifact's metrics hold only `verify`: inspect shows it (it once crashed,
    taking them for a train stage's metrics)."""
    art, merged = tmp_path / "art", tmp_path / "merged"
    bert = tiny_model_dir("bert")
    assert run_cli(capsys, "decompose", bert, "-o", art, "--layers", "FFN_1", "-n", "3").code == 0
    assert run_cli(capsys, "merge", art, "-o", merged, "--verify", "-q").code == 0
    result = run_cli(capsys, "inspect", merged)
    assert result.code == 0, result
    assert "merge verified: max |diff|" in result.out
    assert "trained" not in result.out
