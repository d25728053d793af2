"""`mposurgeon decompose`: parse flags, call the stage, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    DecomposeJson,
    emit,
    model_counts,
    params_from_counts,
    planned_params,
    source_of,
    total_of,
)
from mposurgeon.cli.render import fmt_int, inner_bonds, module_table, progress_bar, stdout


@opt.shared_flags(*opt.STAGE_FLAGS)
def decompose_command(
    model: Annotated[str, typer.Argument(help="HF model dir, artifact dir, or hub id.")],
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            "-l",
            help="Weight groups: FFN_1,FFN_2,attention,embeddings,pooler,lm_head "
            "(default: FFN_1,FFN_2,attention, or an artifact's selection).",
        ),
    ] = None,
    target_modules: Annotated[
        str | None, typer.Option("--target-modules", help="Regex, full match on module names.")
    ] = None,
    exclude_modules: Annotated[
        str | None, typer.Option("--exclude-modules", help="Regex of module names to leave dense.")
    ] = None,
    num_cores: Annotated[int, typer.Option("--num-cores", "-n", help="Cores per MPO.")] = 5,
    modes: Annotated[
        list[str] | None,
        typer.Option(
            "--modes",
            help="'auto' or OUTxIN modes, e.g. 4,4,8,6,4x3,4,4,4,4 (repeatable; a spec "
            "applies to matrices it holds exactly, or with padding).",
        ),
    ] = None,
    max_bond: Annotated[int | None, typer.Option("--max-bond", help="Cap every bond.")] = None,
    rel_tol: Annotated[
        float | None, typer.Option("--rel-tol", help="Relative Frobenius error bound per matrix.")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Core dtype: auto (float32 for float16/bfloat16 weights, with a fixup that "
            "makes a lossless merge bitwise; else the weight's), keep, float32 or float64.",
        ),
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List targets, modes, bonds and sizes; write nothing.")
    ] = False,
    device: opt.Device = "auto",
    *,
    flags: opt.StageFlags,
) -> None:
    """Factorize weight matrices into MPO cores (lossless unless --max-bond/--rel-tol).

    Example:

        mposurgeon decompose bert-base --layers FFN_1,attention -o bert-mpo
    """
    from mposurgeon.stages.decompose import DecomposeOptions, decompose

    options = DecomposeOptions(
        layers=layers,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        num_cores=num_cores,
        modes=modes or ["auto"],
        max_bond=max_bond,
        rel_tol=rel_tol,
        dtype=dtype,
        dry_run=dry_run,
        device=device,  # type: ignore[arg-type]
        **flags.stage_kwargs(),
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = decompose(model, options, progress=progress)
    rows = [_row(m) for m in result.modules]
    if flags.json_out:
        emit(DecomposeJson, **_summary(model, result, rows, flags))
        return
    if dry_run:
        stdout.print(module_table(rows, f"planned decomposition (dry run): {len(rows)} modules"))
    else:
        worst = max(r["rel_error"] for r in rows)
        stdout.print(f"decomposed {len(rows)} modules; largest relative error {worst:.2e}")
    stdout.print(
        f"MPO parameters: {fmt_int(result.mpo_params)} "
        f"(dense: {fmt_int(result.dense_params)}, ratio "
        f"{result.mpo_params / max(result.dense_params, 1):.3f})"
    )
    if result.skipped:
        stdout.print(f"already MPO, left as they are: {len(result.skipped)} modules")
    if result.output:
        stdout.print(f"wrote {Path(result.output)}  (details: mposurgeon inspect {result.output})")


def _summary(
    model: str, result: Any, rows: list[dict[str, Any]], flags: opt.StageFlags
) -> dict[str, Any]:
    """The fields of `DecomposeJson`: the output's parameter counts (a dry run: the input's,
    with each planned matrix replaced by its cores)."""
    source, before = source_of(model, flags)
    if result.output is not None:
        params = params_from_counts(model_counts(result.output), before=total_of(before))
    else:
        planned = result.mpo_params - result.dense_params
        params = planned_params(before, planned, result.mpo_params, result.dense_params)
    return {
        "input": source,
        "output": result.output,
        "dry_run": result.output is None,
        "params": params,
        "decomposed": {"mpo": result.mpo_params, "dense_equivalent": result.dense_params},
        "modules": [{**r, "bonds": inner_bonds(r["bonds"])} for r in rows],
        "skipped_already_mpo": result.skipped,
    }


def _row(m: Any) -> dict[str, Any]:
    rec = m.record
    return {
        "name": m.target.name,
        "group": m.target.group,
        "layer": m.target.kind,
        "shape": [m.target.out_dim, m.target.in_dim],
        "modes": [list(m.shape.out_modes), list(m.shape.in_modes)],
        "padding": [m.shape.out_padding, m.shape.in_padding],
        "bonds": list(m.bonds),
        "params": m.params,
        "overparam_factor": m.params / (m.target.out_dim * m.target.in_dim),
        "rel_error": rec.rel_error if rec else None,
        "predicted_error": rec.predicted_error if rec else None,
        "entropy": rec.entropy if rec else None,
    }
