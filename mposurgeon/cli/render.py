"""Terminal output: JSON on stdout, progress and errors on stderr, rich tables."""

from __future__ import annotations

import json
import math
import numbers
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def progress_bar(quiet: bool) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a rich bar on stderr; None when quiet or not a terminal."""
    if quiet or not stderr.is_terminal:
        yield None
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


def fmt_bonds(bonds: list[int] | None) -> str:
    return "-" if not bonds else ",".join(map(str, bonds[1:-1]))


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
