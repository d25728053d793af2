"""`mposurgeon prune`: parse flags, call the stage, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    PruneJson,
    emit,
    model_counts,
    params_from_counts,
    planned_params,
    source_of,
)
from mposurgeon.cli.render import fmt_int, progress_bar, stdout


@opt.shared_flags(*opt.STAGE_FLAGS)
def prune_command(
    model: Annotated[str, typer.Argument(help="HF model dir, artifact dir, or hub id.")],
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity", help="Zero this fraction (0, 1) of each targeted matrix, smallest |w|."
        ),
    ] = None,
    global_scope: Annotated[
        bool, typer.Option("--global", help="--sparsity over all targeted matrices together.")
    ] = False,
    heads: Annotated[
        int | None, typer.Option("--heads", help="Attention heads to remove per layer.")
    ] = None,
    ffn_neurons: Annotated[
        int | None, typer.Option("--ffn-neurons", help="FFN neurons to remove per layer.")
    ] = None,
    score: Annotated[
        str, typer.Option("--score", help="Rank heads/neurons by magnitude or fisher (--data).")
    ] = "magnitude",
    data: Annotated[
        Path | None, typer.Option("--data", help="Labelled JSONL/CSV for --score fisher.")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", "-l", help="--sparsity: weight groups (default FFN_1,FFN_2,attention)."
        ),
    ] = None,
    target_modules: Annotated[
        str | None, typer.Option("--target-modules", help="Regex, full match on module names.")
    ] = None,
    exclude_modules: Annotated[
        str | None, typer.Option("--exclude-modules", help="Regex of module names to leave.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would go; write nothing.")
    ] = False,
    *,
    flags: opt.StageFlags,
) -> None:
    """Prune weights (unstructured) or remove attention heads / FFN neurons (structured).

    Example:

        mposurgeon prune bert-base --sparsity 0.5 -o bert-sparse
    """
    from mposurgeon.stages.prune import PruneOptions, prune

    options = PruneOptions(
        sparsity=sparsity,
        global_scope=global_scope,
        heads=heads,
        ffn_neurons=ffn_neurons,
        score=score,  # type: ignore[arg-type]
        data=data,
        layers=layers,  # type: ignore[arg-type]
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        dry_run=dry_run,
        **flags.stage_kwargs(),
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = prune(model, options, progress=progress)
    sparsity_of_all = result.pruned / max(result.numel, 1) if result.matrices else None
    if flags.json_out:
        source, counts = source_of(model, flags)
        if result.output is not None:
            params = params_from_counts(model_counts(result.output))
        else:  # the stage's count of what it would write; MPO modules are left as they are
            params = planned_params(counts, result.params_after - result.params_before, 0, 0)
        emit(
            PruneJson,
            input=source,
            output=result.output,
            dry_run=dry_run,
            params=params.model_copy(update={"before": result.params_before}),
            mode=result.mode,
            matrices=[
                {"name": m.name, "shape": list(m.shape), "pruned": m.pruned, "sparsity": m.sparsity}
                for m in result.matrices
            ],
            units=[_units(u) for u in result.units],
            pruned=result.pruned if result.matrices else None,
            sparsity=sparsity_of_all,
        )
        return
    verb = "would zero" if dry_run else "zeroed"
    if result.matrices:
        stdout.print(
            f"{verb} {fmt_int(result.pruned)} of {fmt_int(result.numel)} weights in "
            f"{len(result.matrices)} matrices (sparsity {sparsity_of_all:.4f}"
            + (", global)" if global_scope else ", per matrix)")
        )
    for u in result.units:
        stdout.print(_units_line(u, dry_run))
    if result.params_after != result.params_before:
        stdout.print(
            f"parameters: {fmt_int(result.params_before)} -> {fmt_int(result.params_after)}"
        )
    if result.output:
        stdout.print(f"wrote {result.output}  (details: mposurgeon inspect {result.output})")


def _units(u: Any) -> dict[str, Any]:
    return {
        "kind": u.kind,
        "count": u.count,
        "removed": u.removed,
        "masked": not u.removed,
        "units_before": u.units_before,
        "query_heads_per_unit": u.unit_heads,
        "config_changes": u.config_changes,
        "params_removed": u.params_removed,
        "weights_masked": u.weights_masked,
        "per_block": u.per_block,
    }


def _units_line(u: Any, dry_run: bool) -> str:
    what = "attention heads" if u.kind == "heads" else "FFN neurons"
    if u.kind == "heads" and u.unit_heads > 1:
        what = f"key/value heads (each with its {u.unit_heads} query heads)"
    blocks = len(u.per_block)
    if u.removed:
        verb = "would remove" if dry_run else "removed"
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in u.config_changes.items() if a != b)
        return f"{verb} {u.count} of {u.units_before} {what} in each of {blocks} blocks ({changes})"
    verb = "would mask" if dry_run else "masked"
    return (
        f"{verb} (not removed: the config cannot express it) {u.count} of {u.units_before} "
        f"{what} in each of {blocks} blocks: {fmt_int(u.weights_masked)} weights set to exact "
        "zeros, mask kept in the artifact"
    )
