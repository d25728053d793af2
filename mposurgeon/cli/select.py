"""`mposurgeon select`: parse flags, call the stage, render the ranked scores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    SELECTION_KEYS,
    SelectJson,
    emit,
    model_counts,
    params_from_counts,
    source_of,
    total_of,
)
from mposurgeon.cli.render import progress_bar, stdout


@opt.shared_flags(*opt.STAGE_FLAGS)
def select_command(
    model: Annotated[str, typer.Argument(help="HF model dir, artifact dir, or hub id.")],
    top_n: Annotated[
        int,
        typer.Option(
            "--top-n",
            help="Matrices (layers) to choose per weight pattern: FFN_1, FFN_2 and each "
            "attention projection (q, k, v, o) separately.",
        ),
    ],
    weight_types: Annotated[
        str | None,
        typer.Option(
            "--weight-types", help="Comma list of FFN_1, FFN_2, attention (default: all)."
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="fisher (needs --data), magnitude (RMS weight) or entropy (MPO bond entropy).",
        ),
    ] = "fisher",
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Labelled JSONL/CSV (text, label).")
    ] = None,
    max_batches: Annotated[
        int | None, typer.Option("--max-batches", help="Score on at most this many batches.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per batch.")] = 16,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Tokens per example (truncated).")
    ] = 128,
    max_grad_norm: Annotated[
        float | None,
        typer.Option(
            "--max-grad-norm", help="fisher: clip all gradients together to this norm (0: off)."
        ),
    ] = 1.0,
    split_num: Annotated[
        int,
        typer.Option(
            "--split-num",
            help="Dynamic selection: K rounds of top-n/K matrices per pattern during training.",
        ),
    ] = 1,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", help="Training epochs, to record the rounds' epochs now."),
    ] = None,
    num_cores: Annotated[
        int, typer.Option("--num-cores", help="entropy: cores of a dense matrix's MPO.")
    ] = 5,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds the scoring head and the data order.")
    ] = 0,
    *,
    flags: opt.StageFlags,
) -> None:
    """Score weight matrices and record the top N per weight pattern (decompose follows it).

    Example:

        mposurgeon select minilm --top-n 2 --data data/sentiment-train.jsonl
    """
    from mposurgeon.stages.select import SelectOptions, select

    kwargs: dict[str, Any] = {} if weight_types is None else {"weight_types": weight_types}
    options = SelectOptions(
        top_n=top_n,
        method=method,  # type: ignore[arg-type]
        data=data,
        max_batches=max_batches,
        batch_size=batch_size,
        max_length=max_length,
        max_grad_norm=max_grad_norm or None,
        split_num=split_num,
        epochs=epochs,
        num_cores=num_cores,
        seed=seed,
        **kwargs,
        **flags.stage_kwargs(),
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = select(model, options, progress=progress)
    sel = result.selection.model_dump(mode="json")
    if flags.json_out:
        source, counts = source_of(model, flags)
        recorded = {key: sel.get(key) for key in SELECTION_KEYS}
        emit(
            SelectJson,
            input=source,
            output=result.output,
            params=params_from_counts(model_counts(result.output), before=total_of(counts)),
            candidates=result.candidates,
            batches=result.batches,
            examples=result.examples,
            seconds=result.seconds,
            **recorded,
        )
        return
    how = sel["method"]
    if result.batches is not None:
        how += f", {result.batches} batches / {result.examples} examples"
    stdout.print(f"scored {result.candidates} matrices ({how}) in {result.seconds:.1f} s")
    stdout.print(selection_table(sel))
    per_pattern = sel["top_n"] // sel["split_num"]
    stdout.print(f"chose {len(sel['chosen'])} matrices ({per_pattern} per weight pattern)")
    schedule = sel.get("schedule")
    if schedule:
        stdout.print(schedule_line(schedule))
    stdout.print(f"wrote {result.output}  (next: mposurgeon decompose {result.output})")


def schedule_line(schedule: dict[str, Any]) -> str:
    """One line describing a dynamic selection schedule and how many rounds were chosen."""
    rounds = schedule["rounds"]
    epochs = [r["epoch"] for r in rounds]
    when = (
        "at epochs " + ", ".join(map(str, epochs))
        if all(e is not None for e in epochs)
        else "at epochs set by `train --epochs`"
    )
    done = sum(r.get("chosen") is not None for r in rounds)
    state = (
        "all chosen"
        if done == len(rounds)
        else f"{done} of {len(rounds)} rounds chosen, train scores the rest (fisher)"
    )
    return (
        f"dynamic: {schedule['split_num']} rounds of {schedule['per_round']} per weight pattern "
        f"{when}; {state}"
    )


def selection_table(selection: dict[str, Any]) -> Table:
    """The scores ranked per weight pattern (patterns in module order), best first, chosen
    modules marked."""
    scores: dict[str, float] = selection.get("scores") or {}
    patterns: dict[str, str] = selection.get("patterns") or {}
    chosen = set(selection.get("chosen") or [])
    title = f"selection ({selection.get('method')}, top {selection.get('top_n')} per pattern"
    rounds = selection.get("split_num") or 1
    title += f" in {rounds} rounds)" if rounds > 1 else ")"
    table = Table(title=title, title_justify="left")
    for col, kw in [
        ("pattern", {}),
        ("rank", {"justify": "right"}),
        ("module", {}),
        ("score", {"justify": "right"}),
        ("chosen", {"justify": "center"}),
    ]:
        table.add_column(col, **kw)
    by_pattern: dict[str, list[str]] = {}
    for name in scores:
        by_pattern.setdefault(patterns.get(name, "-"), []).append(name)
    for pattern in by_pattern:
        ranked = sorted(by_pattern[pattern], key=lambda n: (-scores[n], n))
        for rank, name in enumerate(ranked, 1):
            table.add_row(
                pattern if rank == 1 else "",
                str(rank),
                name,
                f"{scores[name]:.3e}",
                "✓" if name in chosen else "",
                end_section=rank == len(ranked),
            )
    return table
