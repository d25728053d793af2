"""eval: the metrics of a trained model on data; writes nothing.

The story: resolve the model (a dense Hugging Face checkpoint with a trained task head, an
artifact, or a merged output) and verify it as every stage does; check its config against its
weights; the task is the trained head's (`training.model.trained_task`: a sequence classifier
or regressor, a causal LM, a seq2seq LM; `--task` must agree); read the data for that task;
for a classifier take the label ids from the model's config (`label2id`: the labels of the
data it was trained on) and refuse data labels the model does not know; load the model as it
is (an artifact's MPO modules stay factorized: `load_model`, no merge) with the tokenizer
`train` uses (a pad token for GPT-2, Llama, BLOOM); encode the rows as `train` does
(`Task.encode`, `--max-length`) and score them with the function that scores `train`'s
evaluations (`training.tasks.evaluate`, and with `--generate` the exact match of greedy
generations, `training.generation`).

So `eval` of a trained artifact on its `--eval-data`, with train's `--max-length` and
`--batch-size`, gives the metrics of train's last evaluation (accuracy, macro-F1 and MCC
equal; losses equal to rounding: padding depends on the batch), and `eval` of its merged
checkpoint gives them within merge's tolerance. It is how a stage's cost shows: `eval` before,
`eval` after `truncate`.

A model's config that still holds Hugging Face's default labels (`LABEL_0`, `LABEL_1`, ...)
accepts data labelled with the integers 0, 1, ... for them.

A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) is scored as the
`PeftModel` on its base model (`--base`, else the one its config records; `stages/peft_adapter.py`
reads, checks and loads it), through the same code from the data on. Its task is the head of its
task type, and a classifier's labels come from the base when it is a classifier of the adapter
head's size with label names of its own, else from the data (`peft_adapter.adapter_labels`: an
adapter records no label names, only its head's size; the data's labels numbered as `train`
numbers them, or integer labels as the ids).

In a recipe, `eval` scores the output of the last stage before it that wrote an artifact, and
its `expect: {min_eval_accuracy: ...}` gates on it; it writes nothing and always runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from torch.utils.data import DataLoader

from mposurgeon.artifact.config import read_config
from mposurgeon.errors import DataError, UsageError
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages import peft_adapter
from mposurgeon.stages.common import InputOptions, model_layout, open_input, tensor_shapes
from mposurgeon.training.data import (
    DEFAULT_EVAL_SPLIT,
    DataOptions,
    TaskName,
    TextDataset,
    read_dataset,
)
from mposurgeon.training.generation import check_generation, generation_for
from mposurgeon.training.loop import Device, Precision, launch_accelerator
from mposurgeon.training.model import ModelSetup, classifier_labels, trained_model, trained_task
from mposurgeon.training.tasks import Task
from mposurgeon.training.tasks import evaluate as evaluate_task


class EvalOptions(InputOptions, DataOptions):
    """Options of `eval` (the CLI flags, one to one): the model's input options, the data
    (`DataOptions`, as train's: a file, a saved data set or a data set id, its split, by
    default `validation`, and columns) and how it is batched. Use train's `max_length` and
    `batch_size` to reproduce its last evaluation exactly."""

    max_length: int = Field(128, ge=2, description="tokens per row (truncated), as train's")
    batch_size: int = Field(16, ge=1, description="rows per batch and process")
    task: TaskName | None = Field(None, description="the model head's (checked if given)")
    generate: bool = Field(False, description="score exact match of greedy generations")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per row (--generate)")
    precision: Precision | None = Field(
        None, description="bf16, fp16: autocast, as train's; None: the launcher's, or fp32"
    )
    device: Device = Field("auto", description="auto: a GPU when there is one")
    base: str | None = Field(
        None, description="a PEFT adapter's base model (default: its adapter_config.json's)"
    )


@dataclass
class EvalResult:
    """The scores of `model` on `data`: `metrics` holds the task's figures
    (`training.tasks`: classification accuracy, macro_f1, mcc, loss; regression pearson,
    spearman, loss; causal-lm and seq2seq loss, perplexity, tokens, and with `--generate`
    exact_match), and rows. `labels`: a classifier's label names, else empty."""

    model: str
    data: dict[str, Any]  # what was read (`TextDataset.record`: path and sha256 of a file)
    data_name: str  # the data as messages name it (file name, or `id (config, split)`)
    task: str
    labels: list[str]
    metrics: dict[str, Any]
    kind: str = "hf"  # the input: "artifact" (with a manifest), "hf" (a checkpoint), "peft"
    is_main_process: bool = True


def evaluate(
    model: str | Path,
    options: EvalOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> EvalResult:
    """Score the trained model `model` on the rows of `data`; nothing is written.

    `options` or keyword arguments (the same names as the CLI flags) configure it:
    `mposurgeon.evaluate("out/v2-train", data="eval.jsonl").metrics["accuracy"]`.
    """
    opts = options or EvalOptions(**kwargs)  # type: ignore[arg-type]
    if peft_adapter.is_adapter_dir(model):
        return _evaluate_adapter(model, opts, progress)
    if opts.base is not None:
        raise UsageError(
            f"--base applies to a PEFT adapter directory, and {model} is none "
            f"(no {peft_adapter.ADAPTER_CONFIG})",
            hint="leave --base out",
        )
    inp = open_input(model, opts)
    model_layout(inp.path, tensor_shapes(inp))  # config.json read, checked against the weights
    config = read_config(inp.path)
    task = trained_task(inp.path, config, opts.task)
    data = _eval_data(opts, task)
    labels: list[str] = []
    if task.has_classes:
        labels = classifier_labels(inp.path, config)
        data = data.with_labels(_data_labels(data, labels))
    is_artifact = inp.manifest is not None
    # open_input has verified the artifact's checksums.
    setup = trained_model(inp.path, config, task, is_artifact=is_artifact, verify=False)
    kind = "artifact" if is_artifact else "hf"
    return _score(str(model), setup, task, data, labels, opts, progress, kind)


def _evaluate_adapter(
    model: str | Path, opts: EvalOptions, progress: ProgressCallback | None
) -> EvalResult:
    """`evaluate` of a PEFT adapter directory: the `PeftModel` on its base, unmerged."""
    adapter = peft_adapter.read_adapter(model)
    base = peft_adapter.open_base(adapter, opts.base, opts)
    config = peft_adapter.head_config(adapter, base)
    task = trained_task(adapter.path, config, opts.task)
    data = _eval_data(opts, task)
    labels: list[str] = []
    if task.has_classes:
        labels = peft_adapter.adapter_labels(adapter, config, data)
        data = data.with_labels(_data_labels(data, labels))
    setup = peft_adapter.peft_setup(adapter, base, config, task)
    return _score(str(model), setup, task, data, labels, opts, progress, "peft")


def _eval_data(opts: EvalOptions, task: Task) -> TextDataset:
    """The rows `opts` name, read for `task` (and checked for `--generate`)."""
    data = read_dataset(
        opts.data,
        config=opts.data_config,
        split=opts.split,
        columns=opts.columns(task=task.name),
        default_split=DEFAULT_EVAL_SPLIT,
        hub_cache=opts.cache_dir,
    )
    if opts.generate:
        check_generation(task, data, "--data")
    return data


def _score(
    model: str,
    setup: ModelSetup,
    task: Task,
    data: TextDataset,
    labels: list[str],
    opts: EvalOptions,
    progress: ProgressCallback | None,
    kind: str,
) -> EvalResult:
    """Score the loaded model (`setup`) on `data` as `train` scores its evaluations."""
    rows = task.encode(data, setup.tokenizer, opts.max_length)
    loader = DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=opts.batch_size,
        shuffle=False,
        collate_fn=task.collator(setup.tokenizer, setup.model),
    )
    generation = generation_for(opts, task, data, setup.tokenizer)
    with launch_accelerator(opts.precision, opts.device) as accelerator:
        net, loader = accelerator.prepare(setup.model, loader)
        scores = evaluate_task(
            accelerator, net, loader, task, generation=generation, progress=progress
        )
        main = accelerator.is_main_process
    return EvalResult(
        model=model,
        data=data.record(),
        data_name=data.name,
        task=task.name,
        labels=labels,
        metrics=scores,
        kind=kind,
        is_main_process=main,
    )


def _data_labels(data: TextDataset, labels: list[str]) -> list[str]:
    """The model's label names as the data spells them: `labels`, or for a config with
    Hugging Face's default names (LABEL_0, LABEL_1, ...) the integers 0, 1, ... when the data
    uses those. A data label the model does not know is an error naming its line."""
    names = {str(ex.label) for ex in data.examples}
    if names <= set(labels):
        return labels
    numbered = [str(i) for i in range(len(labels))]
    if labels == [f"LABEL_{i}" for i in range(len(labels))] and names <= set(numbered):
        return numbered
    unknown = [ex for ex in data.examples if str(ex.label) not in labels]
    others = len({str(ex.label) for ex in unknown}) - 1
    more = f" ({others} other unknown label{'s' if others > 1 else ''})" if others else ""
    raise DataError(
        f"{data.name} {data.unit} {unknown[0].line}: label {unknown[0].label!r} is not one of "
        f"the model's labels ({', '.join(labels)}){more}",
        hint="evaluate on data labelled like the model's training data",
    )
