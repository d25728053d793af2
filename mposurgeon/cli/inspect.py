"""`mposurgeon inspect`: describe a checkpoint, artifact or safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import InspectJson, emit, params_from_counts
from mposurgeon.cli.render import fmt_int, inner_bonds, module_table, stdout


@opt.shared_flags(*opt.HUB_FLAGS, "no_verify", "json_out")
def inspect_command(
    path: Annotated[
        str, typer.Argument(help="Artifact, HF model dir, .safetensors file or hub id.")
    ],
    all_modules: Annotated[
        bool, typer.Option("--all", help="List dense matrices too, not only MPO modules.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw a PNG: a trained artifact's training curves (loss and eval metrics "
            "per step), any other artifact's MPO bond spectra (needs matplotlib).",
        ),
    ] = None,
    *,
    flags: opt.StageFlags,
) -> None:
    """Show modules, modes, bonds, parameters, errors, entropy and lineage.

    Example:

        mposurgeon inspect mposurgeon-out/all-MiniLM-L6-v2/v1-decompose
    """
    from mposurgeon.stages.inspect import inspect, plot_kind

    report = inspect(
        path,
        verify=not flags.no_verify,
        revision=flags.revision,
        offline=flags.offline,
        cache_dir=flags.cache_dir,
        plot=plot,
    )
    if flags.json_out:
        emit(InspectJson, **inspect_fields(report))
        return
    render_report(report, all_modules)
    if report.get("plot"):
        stdout.print(f"{plot_kind(report.get('stage'))} plotted to {report['plot']}")


def inspect_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of `InspectJson` from the inspect stage's report: the common `params`
    (`dense_equivalent_of_mpo` as `dense_equivalent`; `multiply_adds` beside it), inner bonds,
    every optional part present (null when absent), an experts' `params` as `expert_params`."""
    counts = dict(report["params"])
    experts = report.get("experts")
    if experts is not None:
        p = experts["params"]
        dense = (p["dense_experts"] - p["routers"]) // max(experts["experts"], 1)
        experts = {key: value for key, value in experts.items() if key != "params"} | {
            "expert_params": {"dense": dense, **p}
        }
    return {
        "input": report["path"],
        "kind": report["kind"],
        "name": report["name"],
        "model_id": report.get("model_id"),
        "format_version": report["format_version"],
        "stage": report["stage"],
        "lineage": report["lineage"],
        "base": report["base"],
        "params": params_from_counts(counts),
        "multiply_adds": counts.get("multiply_adds"),
        "modules": [{**m, "bonds": inner_bonds(m.get("bonds"))} for m in report["modules"]],
        "selection": report.get("selection"),
        "metrics": report.get("metrics"),
        "pruning": report.get("pruning"),
        "experts": experts,
        "plot": report.get("plot"),
    }


def render_report(report: dict[str, Any], all_modules: bool) -> None:
    """The inspect report as a header, module tables, totals and lineage."""
    head = f"{report['kind']}: {report['path']}"
    if report.get("stage"):
        head += f"  (stage {report['stage']}, format v{report['format_version']})"
    stdout.print(head)
    mpo = [m for m in report["modules"] if m["kind"] == "mpo"]
    dense = [m for m in report["modules"] if m["kind"] != "mpo"]
    if mpo:
        stdout.print(module_table(mpo, f"MPO modules: {len(mpo)}"))
    if dense and (all_modules or not mpo):
        stdout.print(module_table(dense, f"dense matrices: {len(dense)}"))
    elif dense:
        stdout.print(f"dense matrices: {len(dense)} (list them with --all)")
    if report.get("pruning") is not None:
        _print_sparsity(dense, all_modules)
    p = report["params"]
    line = (
        f"parameters: total {fmt_int(p['total'])}, MPO {fmt_int(p['mpo'])}, "
        f"dense {fmt_int(p['dense'])}"
    )
    if p.get("mpo_ratio"):
        line += f"; MPO / dense-equivalent = {p['mpo_ratio']:.3f}"
    if p.get("trainable") is not None:
        line += f"; trainable {fmt_int(p['trainable'])}"
    stdout.print(line)
    macs = p.get("multiply_adds")
    if macs and macs["dense_per_row"]:
        stdout.print(
            f"multiply-adds of the MPO layers: {fmt_int(macs['contract_per_row'])} per input row "
            f"contracted through the cores ({macs['contract_per_row'] / macs['dense_per_row']:.2f}"
            f"x the dense {fmt_int(macs['dense_per_row'])}), or {fmt_int(macs['reconstruct'])} "
            "once to rebuild the dense weights; load_model picks the cheaper per call"
        )
    if report.get("experts"):
        _print_experts(report["experts"])
    metrics = report.get("metrics") or {}
    if "steps" in metrics:  # a train stage's metrics (the manifest requires them all together)
        from mposurgeon.cli.train import metrics_lines

        for metrics_line in metrics_lines(metrics):
            stdout.print(metrics_line)
    verify = metrics.get("verify")
    if isinstance(verify, dict) and all(
        isinstance(verify.get(k), (int, float)) for k in ("max_abs_diff", "tolerance")
    ):
        stdout.print(
            f"merge verified: max |diff| {verify['max_abs_diff']:.3g} from the factorized "
            f"model's outputs (tolerance {verify['tolerance']:.3g})"
        )
    if report.get("selection"):
        from mposurgeon.cli.select import schedule_line, selection_table

        stdout.print(selection_table(report["selection"]))
        if report["selection"].get("schedule"):
            stdout.print(schedule_line(report["selection"]["schedule"]))
    for i, entry in enumerate(report.get("lineage") or [], 1):
        stdout.print(f"lineage {i}: {entry['stage']} at {entry['created_at']}")


def _print_sparsity(dense: list[dict[str, Any]], all_modules: bool) -> None:
    """A pruned artifact: the fraction of exact zeros of every matrix (with --all, one line
    each; else the pruned ones' range and the total)."""
    pruned = [m for m in dense if m.get("zeros")]
    zeros = sum(m.get("zeros", 0) for m in dense)
    total = sum(m["params"] for m in dense)
    for m in pruned if all_modules else []:
        stdout.print(f"  {m['name']}: sparsity {m['sparsity']:.4f} ({fmt_int(m['zeros'])} zeros)")
    if pruned:
        low = min(m["sparsity"] for m in pruned)
        high = max(m["sparsity"] for m in pruned)
        stdout.print(
            f"sparsity: {len(pruned)} of {len(dense)} matrices hold exact zeros "
            f"({low:.4f} to {high:.4f}); all matrices {zeros / max(total, 1):.4f} "
            f"({fmt_int(zeros)} of {fmt_int(total)})"
        )
    else:
        stdout.print(f"sparsity: no matrix holds exact zeros ({len(dense)} matrices)")


def _print_experts(moe: dict[str, Any]) -> None:
    """The mixtures of experts: counts, parameters, and each block's training load."""
    p = moe["params"]
    stdout.print(
        f"experts: {moe['experts']} per matrix in {moe['blocks']} FFN blocks (top-{moe['top_k']}, "
        f"{moe['gate']} gates); parameters: shared central cores {fmt_int(p['shared'])}, "
        f"{fmt_int(p['per_expert'])} per expert, routers {fmt_int(p['routers'])}, total "
        f"{fmt_int(p['mpoe'])} ({p['dense_experts'] / max(p['mpoe'], 1):.1f}x fewer than "
        f"{moe['experts']} dense experts: {fmt_int(p['dense_experts'])})"
    )
    for block, load in (moe.get("load") or {}).items():
        shares = " ".join(f"{v:.2f}" for v in load)
        stdout.print(f"  load {block}: {shares}")
