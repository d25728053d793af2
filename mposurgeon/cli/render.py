"""Terminal output: JSON on stdout, progress and errors on stderr, rich tables."""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mposurgeon.errors import UsageError
from mposurgeon.progress import ProgressCallback


class _Console(Console):
    """A rich console that leaves a closed pipe (`... | head -1`) to the CLI's `main`."""

    def on_broken_pipe(self) -> None:
        # rich's default exits 1; `main` exits 0 quietly, as for any other write.
        self.quiet = True
        raise BrokenPipeError


# Tables are not wrapped at 80 columns when piped into a file or a CI log.
stdout = _Console(highlight=False, width=None if sys.stdout.isatty() else 200)
stderr = _Console(stderr=True, highlight=False)

# Whether `print_json` has written the command's object (reset by `main` for every command).
_json_written = False


def reset_json() -> None:
    """Forget that a JSON object was written: a new command starts."""
    global _json_written
    _json_written = False


def json_written() -> bool:
    """Whether this command has already printed its JSON object on stdout."""
    return _json_written


def _finite(data: Any) -> Any:
    """`data` with every NaN or infinite float (numpy's too) replaced by None, recursively."""
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    if isinstance(data, numbers.Real) and not isinstance(data, numbers.Integral):
        value = float(data)
        return value if math.isfinite(value) else None
    return data


def print_json(data: Any) -> None:
    """One strictly valid JSON object on stdout (non-finite floats as null), nothing else."""
    global _json_written
    text = json.dumps(_finite(data), indent=2, default=str, allow_nan=False)
    _json_written = True
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_error(message: str, hint: str | None = None) -> None:
    """One line on stderr: `error: message (hint)`."""
    line = f"error: {message}" + (f" (hint: {hint})" if hint else "")
    stderr.print(line, markup=False, highlight=False, soft_wrap=True)


#: The values of `--log-format`: plain progress lines, or one JSON object per line.
LOG_FORMATS: tuple[str, ...] = ("text", "json")
#: Seconds between two progress lines of one task off a terminal (`--log-interval`).
DEFAULT_LOG_INTERVAL = 30.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _write_stderr(line: str) -> None:
    """`line` and a newline on stderr, flushed (a CI log shows it at once)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _other_rank() -> bool:
    """Whether this is a non-main process of `accelerate launch` / `torchrun` (RANK > 0),
    whose progress would repeat the main process's."""
    return os.environ.get("RANK", "0") not in ("", "0")


def check_log_options(log_format: str, interval: float) -> None:
    """Raise `UsageError` for a log format not in `LOG_FORMATS` or a negative interval (s)."""
    if log_format not in LOG_FORMATS:
        raise UsageError(
            f"unknown log format {log_format!r}", hint=f"use one of {', '.join(LOG_FORMATS)}"
        )
    if not interval >= 0:  # NaN too
        raise UsageError(
            f"the log interval must be 0 or more seconds, not {interval}",
            hint="pass 0 for a line at every report",
        )


def fmt_duration(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on (rounded down to the second)."""
    minutes, secs = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _TaskRun:
    """One run of a task (reports sharing a description's first word), in clock seconds."""

    start: float  # time of the run's first report
    start_done: int  # units done at the first report (the rate counts those after it)
    last_line: float  # time of the last line written (the start until one is)
    last_done: int
    lines: int = 0
    finished: bool = False


class ProgressLog:
    """A progress callback writing plain-text or JSON lines instead of drawing a bar.

    Each task (the first word of the description: "train loss 0.41" is task "train") writes at
    most one line per `interval` seconds, the first one `interval` seconds after its first
    report, and its final report (done == total) always as JSON; as text only when the task
    wrote a line before or ran for `interval` seconds (a quick task prints nothing). A task
    that reports again after finishing, or with fewer units done (each `eval` of a training
    run), starts a new run. The rate (units per second) and time left count from the run's
    first report. `clock` gives seconds (monotonic), `now` the wall time of JSON lines.
    """

    def __init__(
        self,
        write: Callable[[str], None] = _write_stderr,
        log_format: str = "text",
        interval: float = DEFAULT_LOG_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        check_log_options(log_format, interval)
        self.write = write
        self.log_format = log_format
        self.interval = float(interval)
        self.clock = clock
        self.now = now
        self._runs: dict[str, _TaskRun] = {}

    def __call__(self, description: str, done: int, total: int) -> None:
        task = description.split(" ", 1)[0]
        t = self.clock()
        run = self._runs.get(task)
        if run is None or run.finished or done < run.last_done:
            run = self._runs[task] = _TaskRun(start=t, start_done=done, last_line=t, last_done=done)
        run.last_done = done
        run.finished = total > 0 and done >= total
        if run.finished:
            due = self.log_format == "json" or run.lines > 0 or t - run.start >= self.interval
        else:
            due = t - run.last_line >= self.interval
        if not due:
            return
        run.last_line = t
        run.lines += 1
        self.write(self._line(task, description, done, total, run, t))

    def _line(
        self, task: str, description: str, done: int, total: int, run: _TaskRun, t: float
    ) -> str:
        """The text or JSON line of one report at clock time `t`."""
        elapsed = t - run.start
        rate = (done - run.start_done) / elapsed if elapsed > 0 and done > run.start_done else None
        if total > 0 and done >= total:
            remaining: float | None = 0.0
        elif rate:
            remaining = max(total - done, 0) / rate
        else:
            remaining = None
        if self.log_format == "json":
            event = {
                "event": "progress",
                "task": task,
                "description": description,
                "done": done,
                "total": total,
                "elapsed_s": round(elapsed, 3),
                "rate_per_s": rate,
                "remaining_s": None if remaining is None else round(remaining, 3),
                "time": self.now().astimezone(timezone.utc).isoformat(timespec="milliseconds"),
            }
            return json.dumps(event, allow_nan=False)
        return progress_line(description, done, total, elapsed, rate, remaining)


def progress_line(
    description: str,
    done: int,
    total: int,
    elapsed: float,
    rate: float | None,
    remaining: float | None,
) -> str:
    """One plain progress line, e.g. `train 120/342 (35%) loss 0.41, 2.3 it/s, 1:35 elapsed,
    2:41 left`; `rate` in units per second and the times in seconds (an unknown one left out)."""
    task, _, rest = description.partition(" ")
    head = f"{task} {done}/{total}" + (f" ({100 * done // total}%)" if total > 0 else "")
    parts = [head + (f" {rest}" if rest else "")]
    if rate is not None:
        parts.append(f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")
    parts.append(f"{fmt_duration(elapsed)} elapsed")
    if remaining is not None:
        parts.append(f"{fmt_duration(remaining)} left")
    return ", ".join(parts)


@contextmanager
def progress_bar(
    quiet: bool, log_format: str = "text", log_interval: float = DEFAULT_LOG_INTERVAL
) -> Iterator[ProgressCallback | None]:
    """A progress callback for a command: a rich bar on stderr when it is a terminal, else
    plain lines (`ProgressLog`) every `log_interval` seconds; JSON lines with `log_format`
    "json", on a terminal too. None when quiet, and in the non-main processes of a launch."""
    check_log_options(log_format, log_interval)
    if quiet or _other_rank():
        yield None
        return
    if log_format == "json" or not stderr.is_terminal:
        yield ProgressLog(_write_stderr, log_format, log_interval)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int) -> None:
            # One bar per first word: "train loss 0.41" updates the "train" bar's text.
            key = description.split(" ", 1)[0]
            if key not in tasks:
                tasks[key] = progress.add_task(description, total=total)
            progress.update(tasks[key], completed=done, total=total, description=description)

        yield update


#: How each figure of an evaluation is written, in order: (key, label).
_SCORES = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("mcc", "MCC"),
    ("pearson", "Pearson"),
    ("spearman", "Spearman"),
    ("exact_match", "exact match"),
    ("loss", "loss"),
    ("perplexity", "perplexity"),
)


def eval_line(task: str, scores: dict[str, Any]) -> str:
    """An evaluation's figures as one line (`train`'s last evaluation, `eval`); a figure
    absent or None (an artifact trained before it was recorded) is left out."""
    parts = [f"{label} {scores[key]:.4f}" for key, label in _SCORES if scores.get(key) is not None]
    counts = f"{scores['rows']} rows" if scores.get("rows") is not None else ""
    if scores.get("tokens") is not None:
        counts += f", {scores['tokens']} tokens"
    return f"eval ({task}): {', '.join(parts)}" + (f" ({counts})" if counts else "")


def fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def fmt_modes(modes: list[list[int]] | None) -> str:
    if not modes:
        return "-"
    out, inp = modes
    return f"{'·'.join(map(str, out))} x {'·'.join(map(str, inp))}"


def inner_bonds(bonds: list[int] | tuple[int, ...] | None) -> list[int] | None:
    """An MPO's bond dimensions without the boundary 1s: what tables and `--json` show."""
    return None if bonds is None else list(bonds[1:-1])


def fmt_bonds(bonds: list[int] | None) -> str:
    """Full bonds (boundary 1s included) as the inner ones, comma-separated."""
    return "-" if not bonds else ",".join(map(str, inner_bonds(bonds) or []))


def module_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Per-module table: name, shape, modes, inner bonds, params, error, largest bond entropy."""
    table = Table(title=title, title_justify="left", show_lines=False)
    for col, kw in [
        ("module", {}),
        ("shape", {}),
        ("modes (out x in)", {}),
        ("bonds", {}),
        ("params", {"justify": "right"}),
        ("x dense", {"justify": "right"}),
        ("rel. error", {"justify": "right"}),
        ("max entropy", {"justify": "right"}),
    ]:
        table.add_column(col, **kw)
    for r in rows:
        entropy = r.get("entropy") or []
        table.add_row(
            r["name"],
            "x".join(map(str, r["shape"])),
            fmt_modes(r.get("modes")),
            fmt_bonds(r.get("bonds")),
            fmt_int(r.get("params")),
            f"{r['overparam_factor']:.2f}" if r.get("overparam_factor") else "-",
            fmt_err(r.get("rel_error")),
            f"{max(entropy):.2f}" if entropy else "-",
        )
    return table
