"""The `mposurgeon` Typer app: registers the commands and turns errors into exit codes.

Exit codes: 0 ok, 1 error, 2 usage error, 3 verification failure, 4 model not found,
130 interrupted. Errors are one line on stderr; `--debug` (anywhere on the command line) or
MPOSURGEON_DEBUG=1 shows the full traceback. The commands are those of the stages in
`mposurgeon.stages.registry.STAGES`, then `run` and `export-peft`. Nothing here imports torch:
each command imports its stage when it runs, so `mposurgeon --help` stays fast, and a run of one
command imports no other command's module (`build_app`).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from importlib import import_module
from typing import Annotated, NoReturn

import typer

from mposurgeon._version import __version__
from mposurgeon.artifact.store import os_fault_error
from mposurgeon.cli.entry import INTERRUPTED, command_name, failure
from mposurgeon.cli.render import json_written, print_error, print_json, reset_json
from mposurgeon.errors import MposurgeonError
from mposurgeon.stages.registry import STAGES


def build_app(command: str | None = None) -> typer.Typer:
    """The Typer app with every command, or with `command` alone (what `main` runs a known
    command with: importing and converting the other command modules costs a tenth of a
    second of every run). The root callback keeps it a group either way."""
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
    app.callback()(_root)
    for name, module, function in _commands():
        if command is None or name == command:
            app.command(name)(getattr(import_module(module), function))
    return app


def _commands() -> list[tuple[str, str, str]]:
    """(command, CLI module, function) of each command: one per stage, its CLI module's
    `<name>_command`, in the stages' order; then run, and export-peft (which writes a PEFT
    adapter, not an artifact a recipe chains)."""
    commands = [(stage.name, stage.command_module, stage.command) for stage in STAGES]
    commands.append(("run", "mposurgeon.cli.run", "run_command"))
    commands.append(("export-peft", "mposurgeon.cli.export_peft", "export_peft_command"))
    return commands


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mposurgeon {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Surgery on Hugging Face transformer checkpoints with Matrix Product Operators."""


def _raise_interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """click's `ClickException` and `UsageError` as the installed Typer uses them.

    Typer >= 0.26 vendors click (its own copy, not the `click` package); older ones use click.
    Either way `typer.BadParameter` is click's, so its bases are the classes Typer raises.
    """
    bases = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
    return bases["ClickException"], bases["UsageError"]


ClickException, ClickUsageError = _click_exceptions()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _write_fault(exc: BaseException) -> MposurgeonError | None:
    """The error for a disk-full, size-limit, read-only or permission fault behind `exc`."""
    for cause in _chain(exc):
        if isinstance(cause, OSError) and (fault := os_fault_error(cause)) is not None:
            return fault
    return None


def _broken_pipe(exc: BaseException) -> bool:
    """Whether `exc` is (or was raised while handling) a write to a closed pipe."""
    return any(isinstance(e, OSError) and e.errno == errno.EPIPE for e in _chain(exc))


def _quiet_broken_pipe() -> NoReturn:
    """The reader went away (`| head -1`): exit 0 without a word, as the Python docs advise.

    Later writes, including the interpreter's final flush, go to /dev/null.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


def _fail(
    json_out: bool,
    command: str | None,
    code: int,
    kind: str,
    message: str,
    hint: str | None = None,
) -> NoReturn:
    """The one-line error on stderr (and, with --json, one object on stdout naming `command`,
    None when the command line has no known one); exit `code`."""
    print_error(message, hint)
    if json_out and not json_written():
        print_json(failure(message, hint, code, kind, command))
    sys.exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI and exit with the code of its outcome."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MPOSURGEON_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    json_out = "--json" in args
    reset_json()
    # Ctrl-C and SIGTERM interrupt a stage, which then removes its temporary output. (A shell
    # that starts us in the background may have set SIGINT to "ignore": undo that.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _run(args, debug, json_out, command_name(args))
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except SystemExit as exc:
        # click turns a closed pipe into exit 1; the Python docs' pattern is used instead.
        if exc.code and _broken_pipe(exc):
            _quiet_broken_pipe()
        raise
    except BrokenPipeError:
        _quiet_broken_pipe()
    sys.exit(0)


def _run(args: list[str], debug: bool, json_out: bool, command: str | None) -> None:
    """Run the command line `args` (of `command`, None if no known one); every failure ends
    in `_fail` (one line, the JSON object, the code)."""
    group = typer.main.get_command(build_app(command))
    try:
        # Commands return None; an int is the code of an Exit that Typer caught (130 for Ctrl-C).
        code = group.main(args=args, prog_name="mposurgeon", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except (typer.Exit, typer.Abort, KeyboardInterrupt) as exc:
        if isinstance(exc, typer.Exit) and exc.exit_code != 130:
            sys.exit(exc.exit_code)
        _fail(json_out, command, 130, "KeyboardInterrupt", INTERRUPTED)
    except ClickUsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mposurgeon`: the help, exit 2
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "mposurgeon"
        hint = f"see '{where} --help'"
        _fail(json_out, command, exc.exit_code, type(exc).__name__, exc.format_message(), hint)  # type: ignore[attr-defined]
    except ClickException as exc:
        message = exc.format_message()  # type: ignore[attr-defined]
        _fail(json_out, command, exc.exit_code, type(exc).__name__, message)  # type: ignore[attr-defined]
    except MposurgeonError as exc:
        if debug:
            traceback.print_exc()
        _fail(json_out, command, exc.exit_code, type(exc).__name__, str(exc), exc.hint)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if _broken_pipe(exc):
            raise BrokenPipeError from exc
        if type(exc).__name__ == "ValidationError":  # pydantic: an option out of range
            message = _validation_message(exc)
            _fail(json_out, command, 2, "ValidationError", message, "see the command's --help")
        fault = _write_fault(exc)
        if fault is not None:
            _fail(json_out, command, fault.exit_code, "OSError", str(fault), fault.hint)
        _fail(
            json_out,
            command,
            1,
            type(exc).__name__,
            f"internal error: {type(exc).__name__}: {exc}",
            "re-run with --debug for the traceback",
        )


def _validation_message(exc: Exception) -> str:
    """Pydantic's errors as one line: `invalid option --lr: ...`; an error of the options as a
    whole (no field: two options that disagree) without the option prefix."""
    errors = getattr(exc, "errors", lambda: [])()
    parts = []
    for e in errors:
        loc = "-".join(str(p) for p in e.get("loc", ())).replace("_", "-")
        msg = str(e.get("msg")).removeprefix("Value error, ")
        parts.append(f"option --{loc}: {msg}" if loc else msg)
    if not parts:
        return str(exc).splitlines()[0]
    return "invalid " + "; ".join(parts) if errors[0].get("loc") else "; ".join(parts)
