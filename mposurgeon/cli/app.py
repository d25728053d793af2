"""The `mposurgeon` Typer app: registers the commands and turns errors into exit codes.

Exit codes: 0 ok, 1 error, 2 usage error, 3 verification failure, 4 model not found,
130 interrupted. Errors are one line on stderr; `--debug` (anywhere on the command line) or
MPOSURGEON_DEBUG=1 shows the full traceback. Nothing here imports torch: each command imports
its stage when it runs, so `mposurgeon --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Annotated, NoReturn

import click
import typer

from mposurgeon._version import __version__
from mposurgeon.cli.decompose import decompose_command
from mposurgeon.cli.inspect import inspect_command
from mposurgeon.cli.merge import merge_command
from mposurgeon.cli.render import print_error
from mposurgeon.cli.run import run_command
from mposurgeon.cli.select import select_command
from mposurgeon.cli.train import train_command
from mposurgeon.cli.truncate import truncate_command
from mposurgeon.errors import MposurgeonError

app = typer.Typer(
    name="mposurgeon",
    help="Surgery on Hugging Face transformer checkpoints with Matrix Product Operators.\n\n"
    "Example: mposurgeon decompose bert-base --layers FFN_1,attention\n\n"
    "Add --debug anywhere for a full traceback on errors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("decompose")(decompose_command)
app.command("truncate")(truncate_command)
app.command("select")(select_command)
app.command("train")(train_command)
app.command("merge")(merge_command)
app.command("inspect")(inspect_command)
app.command("run")(run_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mposurgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Surgery on Hugging Face transformer checkpoints with Matrix Product Operators."""


def _raise_interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI and exit with the code of its outcome."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MPOSURGEON_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    # Ctrl-C and SIGTERM interrupt a stage, which then removes its temporary output. (A shell
    # that starts us in the background may have set SIGINT to "ignore": undo that.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    command = typer.main.get_command(app)
    try:
        # Commands return None; an int is the code of an Exit that Typer caught (130 for Ctrl-C).
        code = command.main(args=args, prog_name="mposurgeon", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int):
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print_error("interrupted; no partial output was left behind")
        sys.exit(130)
    except MposurgeonError as exc:
        if debug:
            traceback.print_exc()
        print_error(str(exc), exc.hint)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if type(exc).__name__ == "ValidationError":  # pydantic: an option out of range
            print_error(_validation_message(exc), "see the command's --help")
            sys.exit(2)
        print_error(
            f"internal error: {type(exc).__name__}: {exc}",
            "re-run with --debug for the traceback",
        )
        sys.exit(1)
    sys.exit(0)


def _validation_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", lambda: [])()
    parts = [
        f"--{'-'.join(str(p) for p in e.get('loc', ())).replace('_', '-')}: {e.get('msg')}"
        for e in errors
    ]
    return "invalid option " + "; ".join(parts) if parts else str(exc).splitlines()[0]
