"""`mposurgeon moe`: parse flags, call the stage, render the result."""

from __future__ import annotations

from typing import Annotated

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    MoeJson,
    emit,
    model_counts,
    params_from_counts,
    source_of,
    total_of,
)
from mposurgeon.cli.render import fmt_int, progress_bar, stdout


@opt.shared_flags(*opt.STAGE_FLAGS)
def moe_command(
    model: Annotated[str, typer.Argument(help="HF model dir, artifact dir, or hub id.")],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Experts per FFN matrix.")] = 4,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts each token goes through.")] = 1,
    capacity_factor: Annotated[
        float,
        typer.Option(
            "--capacity-factor", help="Training: token slots per expert, x fair share (0: all)."
        ),
    ] = 1.0,
    router_jitter: Annotated[
        float, typer.Option("--router-jitter", help="Training: router input noise U(1-j, 1+j).")
    ] = 0.0,
    gate: Annotated[
        str,
        typer.Option("--gate", help="auto (switch for T5), normalized (Mixtral) or switch."),
    ] = "auto",
    layers: Annotated[
        str | None, typer.Option("--layers", "-l", help="Weight groups (default FFN_1,FFN_2).")
    ] = None,
    target_modules: Annotated[
        str | None, typer.Option("--target-modules", help="Regex, full match on module names.")
    ] = None,
    exclude_modules: Annotated[
        str | None, typer.Option("--exclude-modules", help="Regex of module names to leave.")
    ] = None,
    num_cores: Annotated[
        int, typer.Option("--num-cores", help="MPO cores per matrix (a dense input).")
    ] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the routers' weights.")] = 0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the experts and counts; write nothing.")
    ] = False,
    *,
    flags: opt.StageFlags,
) -> None:
    """Upcycle feed-forward layers into MPO mixtures of experts sharing one central core.

    Example:

        mposurgeon moe all-MiniLM-L6-v2 --experts 4 -o minilm-moe
    """
    from mposurgeon.stages.moe import MoeOptions, moe

    options = MoeOptions(
        experts=experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        router_jitter=router_jitter,
        gate=gate,  # type: ignore[arg-type]
        layers=layers,  # type: ignore[arg-type]
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        num_cores=num_cores,
        seed=seed,
        dry_run=dry_run,
        **flags.stage_kwargs(),
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = moe(model, options, progress=progress)
    if flags.json_out:
        source, counts = source_of(model, flags)
        # a dry run: no total (a matrix the input holds as MPO cores leaves with them)
        output = model_counts(result.output) if result.output is not None else None
        emit(
            MoeJson,
            input=source,
            output=result.output,
            dry_run=dry_run,
            params=params_from_counts(output, before=total_of(counts)),
            experts=result.experts,
            top_k=result.top_k,
            gate=result.gate,
            blocks=[
                {"router": b.router, "matrices": [t.name for t in b.targets], "roles": b.roles}
                for b in result.blocks
            ],
            expert_params={
                "dense": result.dense,
                "shared": result.shared,
                "per_expert": result.per_expert,
                "routers": result.routers,
                "mpoe": result.mpoe,
                "dense_experts": result.dense_experts,
            },
        )
        return
    matrices = sum(len(b.targets) for b in result.blocks)
    verb = "would upcycle" if dry_run else "upcycled"
    stdout.print(
        f"{verb} {matrices} matrices in {len(result.blocks)} FFN blocks to {result.experts} "
        f"experts (top-{result.top_k}, {result.gate} gates)"
    )
    stdout.print(
        f"parameters of those matrices: dense {fmt_int(result.dense)} -> MPOE "
        f"{fmt_int(result.mpoe)} (shared central cores {fmt_int(result.shared)}, "
        f"{fmt_int(result.per_expert)} per expert, routers {fmt_int(result.routers)}); "
        f"{result.experts} dense experts would be {fmt_int(result.dense_experts)} "
        f"({result.dense_experts / max(result.mpoe, 1):.1f}x)"
    )
    if result.output:
        stdout.print(f"wrote {result.output}  (details: mposurgeon inspect {result.output})")
