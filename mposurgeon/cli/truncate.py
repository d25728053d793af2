"""`mposurgeon truncate`: parse flags, call the stage, render the result."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    TruncateJson,
    emit,
    model_counts,
    params_from_counts,
    planned_params,
    source_of,
    total_of,
)
from mposurgeon.cli.render import fmt_bonds, fmt_err, fmt_int, inner_bonds, progress_bar, stdout


@opt.shared_flags(*opt.ARTIFACT_STAGE_FLAGS)
def truncate_command(
    artifact: Annotated[str, typer.Argument(help="Artifact directory with MPO modules.")],
    max_bond: Annotated[
        int | None, typer.Option("--max-bond", help="Cap every bond of every MPO module.")
    ] = None,
    rel_tol: Annotated[
        float | None,
        typer.Option(
            "--rel-tol",
            help="Per-module relative Frobenius error bound; fewest parameters within it.",
        ),
    ] = None,
    param_ratio: Annotated[
        float | None,
        typer.Option(
            "--param-ratio",
            help="Keep this fraction (0, 1] of all MPO parameters, bonds allocated globally "
            "by the smallest discarded singular-value mass per parameter.",
        ),
    ] = None,
    bond_pattern: Annotated[
        list[str] | None,
        typer.Option(
            "--bond-pattern",
            help="REGEX=N: cap the bonds of modules whose name the regex fully matches "
            "(repeatable; first match wins; the target applies to the other modules).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show planned bonds, sizes and errors; write nothing."),
    ] = False,
    device: opt.Device = "auto",
    *,
    flags: opt.StageFlags,
) -> None:
    """Lower MPO bond dimensions without data (each module re-decomposed with smaller bonds).

    Example:

        mposurgeon truncate mposurgeon-out/bert-base-uncased/v1-decompose --param-ratio 0.5
    """
    from mposurgeon.stages.truncate import TruncateOptions, truncate

    options = TruncateOptions(
        max_bond=max_bond,
        rel_tol=rel_tol,
        param_ratio=param_ratio,
        bond_pattern=bond_pattern or [],
        dry_run=dry_run,
        device=device,  # type: ignore[arg-type]
        **flags.stage_kwargs(),
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = truncate(artifact, options, progress=progress)
    rows = [_row(m) for m in result.modules]
    before, after, dense = result.params_before, result.params_after, result.dense_params
    changed = [r for r in rows if r["changed"]]
    max_rel_error = None if dry_run else max((r["rel_error"] for r in rows), default=0.0)
    if flags.json_out:
        source, counts = source_of(artifact, flags)
        if result.output is not None:
            params = params_from_counts(model_counts(result.output), before=total_of(counts))
        else:
            params = planned_params(counts, after - before, after - before, 0)
        emit(
            TruncateJson,
            input=source,
            output=result.output,
            dry_run=dry_run,
            target=result.target,
            params=params,
            truncation={
                "mpo_before": before,
                "mpo_after": after,
                "ratio": after / before if before else None,
                "dense_equivalent": dense,
            },
            truncated_modules=len(changed),
            max_predicted_error=max((r["predicted_error"] for r in rows), default=0.0),
            max_rel_error=max_rel_error,
            modules=[
                {
                    **r,
                    "bonds_before": inner_bonds(r["bonds_before"]),
                    "bonds": inner_bonds(r["bonds"]),
                }
                for r in rows
            ],
        )
        return
    if dry_run:
        title = f"planned truncation (dry run, {result.target}): {len(changed)} of {len(rows)}"
        stdout.print(_table(rows, title + " modules change"))
    else:
        stdout.print(f"truncated {len(changed)} of {len(rows)} MPO modules ({result.target})")
    stdout.print(
        f"MPO parameters: {fmt_int(before)} -> {fmt_int(after)} "
        f"(ratio {after / max(before, 1):.3f}; dense {fmt_int(dense)}, "
        f"ratio to dense {after / max(dense, 1):.3f})"
    )
    worst = max(rows, key=lambda r: r["predicted_error"], default=None)
    if worst is not None:
        line = f"largest predicted error {fmt_err(worst['predicted_error'])} ({worst['name']})"
        if not dry_run:
            line += f", largest measured error {fmt_err(max_rel_error)}"
        stdout.print(line + "  (relative to the input MPO)")
    if result.output:
        stdout.print(f"wrote {result.output}  (details: mposurgeon inspect {result.output})")


def _row(m: Any) -> dict[str, Any]:
    return {
        "name": m.name,
        "shape": list(m.shape),
        "modes": [list(m.modes[0]), list(m.modes[1])],
        "rule": m.rule,
        "changed": m.changed,
        "bonds_before": list(m.bonds_before),
        "bonds": list(m.bonds),
        "params_before": m.params_before,
        "params": m.params,
        "dense_params": m.dense_params,
        "predicted_error": m.predicted_error,
        "rel_error": m.rel_error,
        "entropy": m.entropy,
    }


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    """Before -> after per module: the question a truncation plan answers."""
    table = Table(title=title, title_justify="left")
    for col, kw in [
        ("module", {}),
        ("shape", {}),
        ("bonds before", {}),
        ("bonds after", {}),
        ("params before", {"justify": "right"}),
        ("params after", {"justify": "right"}),
        ("x dense", {"justify": "right"}),
        ("predicted error", {"justify": "right"}),
    ]:
        table.add_column(col, **kw)
    for r in rows:
        table.add_row(
            r["name"],
            "x".join(map(str, r["shape"])),
            fmt_bonds(r["bonds_before"]),
            fmt_bonds(r["bonds"]) if r["changed"] else "(unchanged)",
            fmt_int(r["params_before"]),
            fmt_int(r["params"]),
            f"{r['params'] / r['dense_params']:.2f}",
            fmt_err(r["predicted_error"]),
        )
    return table
