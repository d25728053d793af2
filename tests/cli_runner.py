"""Run the CLI in-process (fast: torch is imported once per test session)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mposurgeon.cli.app import main


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
