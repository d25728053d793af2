"""Run the CLI in-process (fast: torch is imported once per test session)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mposurgeon.cli.app import main
from mposurgeon.progress import ProgressCallback


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> CliResult:
    """`mposurgeon ARGS...` with its exit code, stdout and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return CliResult(code if isinstance(code, int) else 1, captured.out, captured.err)


def assert_one_line_error(result: CliResult, code: int, *needles: str) -> str:
    """The command failed with exit `code` and one `error: ...` line on stderr holding every
    needle (no traceback, no internal error); return that line."""
    assert result.code == code, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def stop_at_step(step: int) -> ProgressCallback:
    """A progress callback that interrupts training (Ctrl-C) when it reports step `step`."""

    def progress(description: str, done: int, total: int) -> None:
        if description.startswith("train") and done == step:
            raise KeyboardInterrupt

    return progress
