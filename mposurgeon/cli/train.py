"""`mposurgeon train`: parse flags, call the stage, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    Params,
    TrainJson,
    emit,
    model_counts,
    params_from_counts,
    source_of,
    total_of,
)
from mposurgeon.cli.render import eval_line, fmt_int, progress_bar, stderr, stdout
from mposurgeon.methods.registry import method_names, methods_help


@opt.shared_flags(*opt.STAGE_FLAGS)
@opt.data_flags()
def train_command(
    model: Annotated[str, typer.Argument(help="Artifact dir, HF model dir, or hub id.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Training data: a JSONL/JSON/CSV/TSV/Parquet file, a save_to_disk directory, "
            "or a data set id in the local HF cache (offline).",
        ),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help=f"The fine-tuning method: {', '.join(method_names(training=True))} (above).",
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", "-m", help="Older name of --method: full, lightweight, overparam."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Eval data (as --data), scored for the task (accuracy, Pearson, perplexity...).",
        ),
    ] = None,
    eval_split: Annotated[
        str | None,
        typer.Option(
            "--eval-split",
            help="Split of the eval data (default validation); alone: of the --data set.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 3,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate (default: the method's, listed above)."),
    ] = None,
    mpo_lr: Annotated[
        float | None, typer.Option("--mpo-lr", help="Learning rate of MPO cores (default --lr).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Rows per batch (per process).")
    ] = 16,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Batches per optimizer step.")
    ] = 1,
    warmup_ratio: Annotated[
        float, typer.Option("--warmup-ratio", help="Fraction of steps of linear warmup.")
    ] = 0.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decay.")] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Clip the global gradient norm.")
    ] = 1.0,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Tokens per row (truncated).")
    ] = 128,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds head, data order, dropout (0 to 2**32-1).")
    ] = 0,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="Evaluate every N steps (and at the end).")
    ] = None,
    precision: opt.Precision = None,
    device: opt.Device = "auto",
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Recompute activations in the backward pass: less memory, more time.",
        ),
    ] = False,
    select_best: Annotated[
        str | None,
        typer.Option(
            "--select-best",
            help="Keep the weights of the evaluation best by this metric (accuracy, loss, "
            "pearson, perplexity, exact_match...), not the last.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what the method would train (counted on the meta device); write nothing.",
        ),
    ] = False,
    save_every: Annotated[
        int | None,
        typer.Option("--save-every", help="Checkpoint every N steps into OUT.partial/."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")
    ] = False,
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic", help="overparam: choose matrices by Fisher score during training."
        ),
    ] = False,
    split_num: Annotated[
        int | None,
        typer.Option("--split-num", help="--dynamic: K rounds, at epochs 0, ceil(E/K), ..."),
    ] = None,
    top_n: Annotated[
        int | None,
        typer.Option("--top-n", help="--dynamic: matrices per weight pattern in all rounds."),
    ] = None,
    weight_types: Annotated[
        str | None,
        typer.Option("--weight-types", help="--dynamic: comma list of FFN_1, FFN_2, attention."),
    ] = None,
    num_cores: Annotated[
        int | None,
        typer.Option("--num-cores", help="overparam: cores of matrices decomposed in place (5)."),
    ] = None,
    lora_r: Annotated[
        int | None,
        typer.Option("--lora-r", help="lora, dsee: rank of the update (lora 8, dsee 16)."),
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(
            "--lora-alpha",
            help="lora, dsee: the update is scaled by alpha/r (lora 16, dsee 2 x r).",
        ),
    ] = None,
    lora_dropout: Annotated[
        float | None,
        typer.Option("--lora-dropout", help="lora, dsee: dropout on the input of A (0)."),
    ] = None,
    sparse_size: Annotated[
        int | None,
        typer.Option(
            "--sparse-size", help="dsee: entries of the sparse update per targeted matrix (64)."
        ),
    ] = None,
    sparse_init: Annotated[
        str | None,
        typer.Option(
            "--sparse-init",
            help="dsee: how the sparse support is chosen: godec (the sparse part of a "
            "low-rank + sparse split of W, default), magnitude (largest |W|) or random.",
        ),
    ] = None,
    squeeze_to: Annotated[
        float | None,
        typer.Option(
            "--squeeze-to",
            help="Cut MPO bonds during training, a step at a time, to this ratio of the MPO "
            "parameters (as truncate --param-ratio).",
        ),
    ] = None,
    squeeze_rel_tol: Annotated[
        float | None,
        typer.Option(
            "--squeeze-rel-tol", help="Squeeze to this error bound per module (as --rel-tol)."
        ),
    ] = None,
    squeeze_steps: Annotated[
        int | None,
        typer.Option("--squeeze-steps", help="Cuts of the squeeze, spread over the run (3)."),
    ] = None,
    squeeze_until: Annotated[
        float | None,
        typer.Option(
            "--squeeze-until",
            help="Fraction of the run by which the last cut is made; the rest recovers (0.75).",
        ),
    ] = None,
    distill_alpha: Annotated[
        float | None,
        typer.Option(
            "--distill-alpha",
            help="Squeeze: weight of distillation (KL on logits) from the model as it was "
            "before the first cut.",
        ),
    ] = None,
    distill_temperature: Annotated[
        float, typer.Option("--distill-temperature", help="Squeeze: distillation temperature.")
    ] = 2.0,
    grad_mask_p: Annotated[
        float | None,
        typer.Option(
            "--grad-mask-p",
            help="mpoe: drop the shared central core's gradient with this probability each "
            "step (0: always update, default; 1: frozen).",
        ),
    ] = None,
    balance_coef: Annotated[
        float | None,
        typer.Option("--balance-coef", help="mpoe: weight of the load-balancing loss (0.01)."),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            help="apet: exactly N elements of the targets train (4096); lora, adapter, "
            "prompt- and prefix-tuning: the largest rank / size / length that fits in N. "
            "A method name (--budget lora): as many as it would train with the options given.",
        ),
    ] = None,
    budget_seed: Annotated[
        int | None, typer.Option("--budget-seed", help="apet: seeds the choice of elements (0).")
    ] = None,
    adapter_size: Annotated[
        int | None,
        typer.Option("--adapter-size", help="adapter: bottleneck width (16)."),
    ] = None,
    num_virtual_tokens: Annotated[
        int | None,
        typer.Option(
            "--num-virtual-tokens", help="prompt-tuning, prefix-tuning: their length (20)."
        ),
    ] = None,
    prompt_init: Annotated[
        str | None,
        typer.Option(
            "--prompt-init",
            help="prompt-tuning: vocab (random vocabulary embeddings, default) or random.",
        ),
    ] = None,
    prefix_init: Annotated[
        str | None,
        typer.Option(
            "--prefix-init",
            help="prefix-tuning: vocab (keys and values of random tokens, default) or random.",
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            "-l",
            help="lora, ia3, apet, dsee: weight groups to adapt, e.g. attention,FFN_1 "
            "(default: PEFT's targets; apet: attention,FFN_1,FFN_2; dsee: attention).",
        ),
    ] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules", help="lora, ia3, apet, dsee: regex of whole module names to adapt."
        ),
    ] = None,
    push_to_hub: opt.PushToHub = None,
    private: opt.Private = False,
    *,
    data_flags: opt.DataFlags,
    flags: opt.StageFlags,
) -> None:
    """Fine-tune with a method (lightweight, overparam, full, ...) for a task:
    classification, regression, causal-lm or seq2seq.

    {methods}

    Example:

        mposurgeon train mposurgeon-out/minilm/v1-decompose --method lightweight
        --data data/sentiment-train.jsonl --eval-data data/sentiment-eval.jsonl
    """
    from mposurgeon.stages.train import TrainingInterrupted, TrainOptions, train

    options = TrainOptions(
        data=data,
        eval_data=eval_data,
        eval_split=eval_split,
        **data_flags.options(),
        method=method,  # type: ignore[arg-type]
        mode=mode,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        mpo_lr=mpo_lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        max_length=max_length,
        seed=seed,
        eval_every=eval_every,
        save_every=save_every,
        select_best=select_best,
        dry_run=dry_run,
        precision=precision,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        gradient_checkpointing=gradient_checkpointing,
        resume=resume,
        dynamic=dynamic,
        split_num=split_num,
        top_n=top_n,
        weight_types=weight_types,  # type: ignore[arg-type]
        num_cores=num_cores,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        sparse_size=sparse_size,
        sparse_init=sparse_init,  # type: ignore[arg-type]
        squeeze_to=squeeze_to,
        squeeze_rel_tol=squeeze_rel_tol,
        squeeze_steps=squeeze_steps,
        squeeze_until=squeeze_until,
        distill_alpha=distill_alpha,
        distill_temperature=distill_temperature,
        grad_mask_p=grad_mask_p,
        balance_coef=balance_coef,
        budget=budget,
        budget_seed=budget_seed,
        adapter_size=adapter_size,
        num_virtual_tokens=num_virtual_tokens,
        prompt_init=prompt_init,  # type: ignore[arg-type]
        prefix_init=prefix_init,  # type: ignore[arg-type]
        layers=layers,  # type: ignore[arg-type]
        target_modules=target_modules,
        push_to_hub=push_to_hub,
        private=private,
        **flags.stage_kwargs(),
    )
    try:
        with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
            result = train(model, options, progress=progress)
    except TrainingInterrupted as exc:
        stderr.print(
            f"train: {exc}; continue with the same command and --resume",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise
    if not result.is_main_process:
        return  # under accelerate launch / torchrun the main process reports
    for warning in result.warnings:
        stderr.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if flags.json_out:
        emit(TrainJson, **_summary(model, result, flags))
        return
    if result.output is None:
        m = result.metrics
        method = m["trainable_params"] - m["trainable_head"]
        stdout.print(
            f"dry run: method {m['method']} would train {fmt_int(method)} parameters in "
            f"{m['modules']} module{'s' if m['modules'] != 1 else ''}, and "
            f"{fmt_int(m['trainable_head'])} of the {m['task']} "
            f"head: {fmt_int(m['trainable_params'])} of {fmt_int(m['total_params'])} in all. "
            "Nothing was loaded or written."
        )
        return
    _render(result.output, result.metrics)
    if result.commit_url is not None:
        stdout.print(f"pushed to {push_to_hub}: {result.commit_url}", markup=False)


# The registered methods, one line each, in `train --help`.
train_command.__doc__ = (train_command.__doc__ or "").replace(
    "{methods}", "\n\n    ".join(["Methods (--method):", *methods_help()])
)


def _summary(model: str, result: Any, flags: opt.StageFlags) -> dict[str, Any]:
    """The fields of `TrainJson`: the output's parameter counts (a dry run: the totals the
    method counted on the meta device; its MPO counts are not known)."""
    source, counts = source_of(model, flags)
    m = result.metrics
    if result.output is not None:
        params = params_from_counts(model_counts(result.output), before=total_of(counts))
    else:
        params = Params(
            total=m.get("total_params"),
            before=total_of(counts),
            trainable=m.get("trainable_params"),
            trainable_head=m.get("trainable_head"),
        )
    return {
        "input": source,
        "output": result.output,
        "dry_run": result.output is None,
        "params": params,
        "metrics": m,
        "warnings": result.warnings,
        "commit_url": result.commit_url,
    }


def _render(output: Path, m: dict[str, Any]) -> None:
    for line in metrics_lines(m):
        stdout.print(line)
    stdout.print(f"wrote {output}  (details: mposurgeon inspect {output})")


def metrics_lines(m: dict[str, Any]) -> list[str]:
    """A train stage's metrics as short lines (for `train` and `inspect`)."""
    resumed = m.get("resumed_from_step")
    final = "-" if m.get("final_loss") is None else f"{m['final_loss']:.4f}"
    epochs = f"{m['epochs']:g} epoch" + ("" if m["epochs"] == 1 else "s")
    lines = [
        f"trained {m['steps']} steps ({epochs}, method {m['method']}"
        + (f", task {m['task']}" if m.get("task") else "")
        + (f", {m['precision']}" if m.get("precision") not in (None, "fp32") else "")
        + (f", resumed at step {resumed}" if resumed is not None else "")
        + (f", {m['num_processes']} processes" if (m.get("num_processes") or 1) > 1 else "")
        + f"): final loss {final}",
        f"trainable parameters: {fmt_int(m['trainable_params'])} of "
        f"{fmt_int(m['total_params'])} ({100 * m['trainable_fraction']:.2f}%)",
    ]
    evals = m.get("eval") or []
    if evals:
        task = m.get("task", "classification")  # artifacts before tasks were classifiers
        last = {**evals[-1], "rows": m.get("eval_rows")}
        if m.get("best_step") is not None:
            last = {**next(e for e in evals if e["step"] == m["best_step"]), "rows": last["rows"]}
            lines.append(
                f"kept the weights of step {m['best_step']} (best {m['best_metric']} of "
                f"{len(evals)} evaluations)"
            )
        lines.append(eval_line(task, last))
    squeeze = m.get("squeeze")
    if squeeze:
        lines += _squeeze_lines(squeeze)
    load = m.get("expert_load")
    if load:
        lines.append(
            "expert load: "
            + "; ".join(f"{block} {' '.join(f'{v:.2f}' for v in v)}" for block, v in load.items())
        )
    return lines


def _squeeze_lines(squeeze: dict[str, Any]) -> list[str]:
    """One line per cut of a squeeze, then the ratio it reached."""
    lines = []
    start, cuts = squeeze["start_params"], squeeze["cuts"]
    for i, cut in enumerate(squeeze["log"], 1):
        line = (
            f"squeeze cut {i} of {cuts} at step {cut['step']}: MPO parameters "
            f"{fmt_int(cut['params_before'])} -> {fmt_int(cut['params_after'])} "
            f"(ratio {cut['params_after'] / start:.3f}), {cut['modules_cut']} modules cut, "
            f"predicted error up to {cut['max_predicted_error']:.3f}"
        )
        before, after = cut.get("eval_before"), cut.get("eval_after")
        if before and after:
            key = "accuracy" if "accuracy" in before else "loss"
            line += f"; eval {key} {before[key]:.3f} -> {after[key]:.3f}"
        lines.append(line)
    if squeeze.get("ratio") is not None:
        lines.append(
            f"squeezed: MPO parameters {fmt_int(squeeze['start_params'])} -> "
            f"{fmt_int(squeeze['final_params'])} (ratio {squeeze['ratio']:.3f})"
        )
    return lines
