"""The `mposurgeon` console script: Ctrl-C is handled from the first import on.

Importing the CLI (Typer, rich, the commands) takes a few tenths of a second, before
`mposurgeon.cli.app.main` has installed its handlers. A Ctrl-C then must not print a
KeyboardInterrupt traceback: this module imports only the standard library itself and turns it
into the CLI's one-line message and exit code 130 (one JSON object too with `--json`).
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

INTERRUPTED = "interrupted; no partial output was left behind"

#: The version of every `--json` object's layout (`mposurgeon.cli.json_schema` documents it).
SCHEMA_VERSION = 1

#: The CLI's commands, in `--help` order (tests/test_json_schema.py: exactly those the app has).
COMMANDS = (
    "decompose",
    "truncate",
    "select",
    "train",
    "eval",
    "merge",
    "inspect",
    "moe",
    "prune",
    "run",
    "export-peft",
)


def command_name(args: list[str]) -> str | None:
    """The command of a command line (its first word that is no option), None when that is
    not one of `COMMANDS` (no command, a misspelt one)."""
    word = next((a for a in args if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def failure(
    message: str, hint: str | None, exit_code: int, kind: str, command: str | None
) -> dict[str, Any]:
    """The JSON object a `--json` command prints on stdout when it fails (`FailureJson`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "ok": False,
        "error": {"message": message, "hint": hint, "exit_code": exit_code, "type": kind},
    }


def main() -> NoReturn:
    """Import and run the CLI; a Ctrl-C before it has taken over exits 130 without a traceback.

    While the CLI imports, SIGINT only records that it came (raising KeyboardInterrupt inside
    the import machinery can surface as "Exception ignored in ..." with a traceback that no
    handler catches); once the import is done, a recorded Ctrl-C exits as one. Before torch
    is imported, large tensors are asked to use huge pages (`memory.py`)."""
    from mposurgeon.memory import use_huge_pages_for_tensors

    use_huge_pages_for_tensors()  # before torch is imported
    try:
        received: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
        try:
            from mposurgeon.cli.app import main as run
        finally:
            signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt
        run()
    except KeyboardInterrupt:
        # A Ctrl-C while importing, or one the CLI has not handled itself.
        _interrupted()


def _interrupted() -> NoReturn:
    """Exit 130 with the CLI's one-line message (and one JSON object with `--json`)."""
    sys.stderr.write(f"error: {INTERRUPTED}\n")
    if "--json" in sys.argv[1:]:
        import json

        args = sys.argv[1:]
        error = failure(INTERRUPTED, None, 130, "KeyboardInterrupt", command_name(args))
        sys.stdout.write(json.dumps(error, indent=2))
        sys.stdout.write("\n")
    sys.exit(130)
