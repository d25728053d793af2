"""`mposurgeon eval`: parse flags, call the stage, render the scores."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import EvalJson, emit, input_of
from mposurgeon.cli.render import eval_line, progress_bar, stdout

#: eval's --split: its default is the validation split.
EvalSplit = Annotated[
    str | None,
    typer.Option("--split", help="Split of a saved DatasetDict or data set id (validation)."),
]


@opt.shared_flags(*opt.HUB_FLAGS, "no_verify", "json_out", *opt.PROGRESS_FLAGS)
@opt.data_flags(split=EvalSplit)
def eval_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Trained model: artifact (factorized), merged output, HF dir or hub id, or a "
            "PEFT adapter directory."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Data (as train's --data): a file, a save_to_disk directory, or a data set "
            "id in the local HF cache (offline).",
        ),
    ],
    max_length: Annotated[
        int, typer.Option("--max-length", help="Tokens per row (truncated), as in train.")
    ] = 128,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Rows per batch (per process).")
    ] = 16,
    precision: opt.Precision = None,
    device: opt.Device = "auto",
    base: opt.PeftBase = None,
    *,
    data_flags: opt.DataFlags,
    flags: opt.StageFlags,
) -> None:
    """Score a trained model on data, for the task of its head: accuracy, macro-F1, MCC
    (classification); Pearson, Spearman (regression); loss and perplexity (causal-lm,
    seq2seq), exact match with --generate.

    The same tokenization and scoring as train's --eval-data; an artifact is evaluated
    factorized (no merge), a PEFT adapter directory as the PeftModel on its base model
    (--base, or the one its config records). Nothing is written.

    Example:

        mposurgeon eval mposurgeon-out/minilm/v2-train --data data/sentiment-eval.jsonl

        mposurgeon eval my-lora-adapter --base minilm --data data/sentiment-eval.jsonl
    """
    from mposurgeon.stages.eval import EvalOptions, evaluate

    options = EvalOptions(
        data=data,
        **data_flags.options(),
        max_length=max_length,
        batch_size=batch_size,
        precision=precision,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        base=base,
        revision=flags.revision,
        offline=flags.offline,
        cache_dir=flags.cache_dir,
        verify_checksums=not flags.no_verify,
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = evaluate(model, options, progress=progress)
    if not result.is_main_process:
        return  # under accelerate launch / torchrun the main process reports
    if flags.json_out:
        emit(
            EvalJson,
            input=input_of(model, flags),
            data=result.data,
            task=result.task,
            labels=result.labels,
            metrics=result.metrics,
        )
        return
    for line in result_lines(result):
        stdout.print(line, markup=False)


def result_lines(result: Any) -> list[str]:
    """An `EvalResult` as short lines (for `eval` and recipes)."""
    head = f"{result.model} ({result.kind}) on {result.data_name}: {result.task}"
    if result.labels:
        head += f", labels {', '.join(result.labels)}"
    return [head, eval_line(result.task, result.metrics)]
