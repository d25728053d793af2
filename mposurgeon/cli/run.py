"""`mposurgeon run`: run a YAML recipe of stages; exit 3 when an `expect:` gate fails.

With `--json`, stdout gets one object whatever happens (`RunJson` of `cli/json_schema.py`): the
stages so far (a failed one marked "failed"; a swept stage one entry per point, with `point` and
`values`), `ok`, on failure the error (message, hint, exit code, type), and `sweep` (null without
swept stages or on a dry run): the paths of `sweep.csv` and `sweep.png` (null when not drawn,
`plot_error` says why), the metric plotted, the CSV's columns and rows, and the plotted lines
(mean, min, max over seeds per x). Every path is absolute.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mposurgeon.cli import options as opt
from mposurgeon.cli.entry import failure
from mposurgeon.cli.eval import result_lines
from mposurgeon.cli.inspect import render_report
from mposurgeon.cli.json_schema import RunJson, build, resolved_path
from mposurgeon.cli.render import print_json, progress_bar, stderr, stdout
from mposurgeon.errors import MposurgeonError


@opt.shared_flags("workdir", "json_out", *opt.PROGRESS_FLAGS)
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (what would run or be skipped).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage.")] = False,
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Re-run from this stage (by name) on.")
    ] = None,
    *,
    flags: opt.StageFlags,
) -> None:
    """Run a recipe: stages chained through versioned artifacts, resumable, with CI gates.

    Example:

        mposurgeon run recipes/quickstart.yaml -w runs
    """
    from mposurgeon.stages.recipe import RecipeStageError, gate_failure, run_recipe

    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:

        def events(stage: Any, status: str) -> None:
            if status != "start" and not flags.json_out:
                stderr.print(f"{stage.label}: {status}", highlight=False)

        try:
            report = run_recipe(
                recipe,
                workdir=flags.workdir,
                dry_run=dry_run,
                force=force,
                from_stage=from_stage,
                events=events,
                progress=progress,
            )
        except RecipeStageError as exc:
            if flags.json_out:
                print_json(_summary(exc.report, exc, exc.kind))
            raise
    error = gate_failure(report)
    if flags.json_out:
        print_json(_summary(report, error, type(error).__name__))
    else:
        _render(report, dry_run)
    if error is not None:
        raise error


def _summary(report: Any, error: MposurgeonError | None, kind: str) -> dict[str, Any]:
    """The JSON object of a run (`RunJson`): the stages so far, `ok`, and the error if there
    was one."""
    outcome = (
        {"ok": True, "error": None}
        if error is None
        else failure(str(error), error.hint, error.exit_code, kind, "run")
    )
    sweep = asdict(report.sweep) if report.sweep is not None else None
    if sweep is not None:  # the CSV's rows as written, their outputs resolved
        sweep["rows"] = [
            {**row, "output": resolved_path(row.get("output"))} for row in sweep["rows"]
        ]
    return build(
        RunJson,
        ok=outcome["ok"],
        error=outcome["error"],
        recipe=report.recipe,
        workdir=report.workdir,
        stages=[
            {
                "name": s.name,
                "point": s.point,
                "values": s.values,
                "kind": s.kind,
                "status": s.status,
                "input": s.input,
                "output": s.output,
                "seconds": round(s.seconds, 3),
                "metrics": s.metrics,
                "gates": [asdict(g) for g in s.gates],
            }
            for s in report.stages
        ],
        sweep=sweep,
    )


def _render(report: Any, dry_run: bool) -> None:
    for s in report.stages:
        if s.kind == "inspect" and s.result is not None:
            render_report(s.result, all_modules=False)
        if s.kind == "eval" and s.result is not None:
            for line in result_lines(s.result):
                stdout.print(line, markup=False)
    table = Table(title=f"recipe {report.recipe}", title_justify="left")
    for col in ("stage", "status", "seconds", "output", "gates"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in report.stages:
        gates = "; ".join(
            f"{g.condition} {g.limit:g}: "
            + ("not measured" if g.measured is None else f"{g.measured:.4g}")
            + (" ok" if g.ok else " FAILED")
            for g in s.gates
        )
        seconds = "-" if dry_run or s.status == "planned" else f"{s.seconds:.1f}"
        name = s.name if s.point is None else escape(f"{s.name} [{s.point}]")
        table.add_row(name, s.status, seconds, s.output or "-", gates or "-")
    stdout.print(table)
    if report.sweep is not None:
        _render_sweep(report.sweep)


def _render_sweep(sweep: Any) -> None:
    """The sweep's means (a row per line and x) and what was written."""
    if sweep.lines:
        table = Table(
            title=f"sweep: {sweep.metric}, mean and min..max over seeds", title_justify="left"
        )
        for col in ("stage", "trainable", "mean", "min..max", "seeds"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for line in sweep.lines:
            for i, x in enumerate(line.x):
                spread = f"{line.low[i]:.4g}..{line.high[i]:.4g}"
                table.add_row(
                    escape(line.label),
                    f"{x:,.0f}",
                    f"{line.mean[i]:.4g}",
                    spread,
                    str(line.count[i]),
                )
        stdout.print(table)
    folder = str(Path(sweep.csv).parent)
    written = ", ".join(Path(p).name for p in (sweep.csv, sweep.png) if p is not None)
    stdout.print(f"wrote {written} in {folder}", markup=False, highlight=False, soft_wrap=True)
    if sweep.plot_error is not None:
        stderr.print(f"warning: no sweep plot: {sweep.plot_error}", markup=False, highlight=False)
