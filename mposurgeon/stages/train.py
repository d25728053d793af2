"""train: fine-tune a checkpoint or artifact for sequence classification with a method.

The story: resolve the input and read the data (labels from the training file); the method
(`--method`, methods/registry.py) checks the input (`lightweight` needs MPO modules;
`overparam` needs MPO modules, a `select` choice, or `--dynamic`); build the
*ForSequenceClassification model with the input's layers in place and a seeded head (a pad
token for GPT-2, Llama, BLOOM); the method prepares it (`overparam` on a `select` artifact
decomposes the chosen matrices losslessly in place); train (training/loop.py, with dynamic
selection from training/dynamic.py) with periodic checkpoints in `<out>.partial/`
(training/resume.py); write the trained model as an artifact.

The output artifact holds the model under its LIVE state-dict names
(`bert.encoder.layer.0.intermediate.dense.mpo.core.2`, `classifier.weight`), tied tensors once;
module records are re-keyed to those names and brought up to date by the method (for MPO
modules: `trainable` = the trained core indices, bonds and parameter counts of the trained
cores, and `rel_error`, `predicted_error` and `entropy` None/empty: they measured a
decomposition against the matrix it factorized, and the trained cores no longer represent that
matrix; merge reproduces the trained weights from the cores exactly).
`config.json` names the *ForSequenceClassification class, `id2label` and `pad_token_id`; the
tokenizer is saved with its pad token. `merge` of it gives a plain classifier checkpoint.

Checkpoints and resume. With `save_every`, checkpoints go to the sibling directory
`<out>.partial/checkpoint` (`<out>` is `-o`, or the versioned directory), with `run.json` naming
the input and options. The directory is removed once the artifact is written; an interrupted
run keeps it (never a partial artifact) and `resume` continues from it: with `-o` the
`<out>.partial` of that output, without `-o` the newest `v<N>-train.partial` of this input in
the workdir, which becomes `v<N>-train`. A damaged checkpoint (a file missing, truncated or
garbled) is an error naming the file, with how to start over (`--overwrite` instead of
`--resume`, or delete the `.partial` directory); it is left as it was.

Divergence: when the loss or the weights become NaN or infinite, training stops with an error
(exit 3) and nothing is written: no artifact, and the `.partial` directory of the run is removed
(its checkpoints would diverge again: a resumed run takes exactly the same steps), unless the
run was itself resumed from it, which then keeps it as it was found or newer (every checkpoint
is checked finite before it is written).

Every float option is finite and the seed lies in 0..2**32-1 (NumPy's range), else a usage
error names the option. `--mode` is the older name of `--method` for full, lightweight and
overparam. The input must ship tokenizer files (training a new empty vocabulary
would map every word to the unknown token), and the tokenizer must know some of the words of
the data.

Multi-process (`accelerate launch`, `torchrun`): every process runs this function; only the main
process writes files, and pushes them with `push_to_hub` (`artifact/hub.py`; a failed push
leaves the artifact in place).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.hub import PushOptions, check_can_push, push_folder
from mposurgeon.artifact.manifest import ModuleRecord
from mposurgeon.artifact.store import (
    check_output_dir,
    release_claim,
    version_parent,
)
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import MposurgeonError, UsageError
from mposurgeon.methods.base import Method, TrainingSource
from mposurgeon.methods.config import MethodConfig, ModuleRegex, comma_list
from mposurgeon.methods.mpo.state import mpo_cores
from mposurgeon.methods.registry import get_method, method_config, method_names
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.models.pruning import keep_pruned, mask_key, masked_key
from mposurgeon.models.surgery import resolve_module_name
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    StageInput,
    StageOptions,
    model_layout,
    open_input,
    plan_output,
    stage_options_record,
    tensor_shapes,
    write_live_model,
)
from mposurgeon.training.data import (
    DEFAULT_EVAL_SPLIT,
    DataOptions,
    TaskName,
    TextDataset,
    read_dataset,
)
from mposurgeon.training.dynamic import (
    DynamicPlan,
    DynamicSelection,
    carried_selection,
    dynamic_selection,
)
from mposurgeon.training.generation import check_generation, generation_for
from mposurgeon.training.loop import (
    CHECKPOINT,
    BestSelection,
    Evaluator,
    LoopConfig,
    LoopState,
    TrainingDiverged,
    TrainingRun,
    launch_accelerator,
    precision_of,
    slow_bf16,
)
from mposurgeon.training.model import (
    ModelSetup,
    enable_gradient_checkpointing,
    training_model,
)
from mposurgeon.training.params import count_parameters
from mposurgeon.training.resume import (
    check_resumable,
    latest_partial_output,
    partial_of,
    run_record,
    start_over_hint,
    start_partial,
)
from mposurgeon.training.squeeze import (
    SQUEEZE_UNTIL,
    Distillation,
    Squeezer,
    SqueezeSchedule,
    reachable_ratio,
)
from mposurgeon.training.tasks import (
    Task,
    check_model_task,
    evaluate,
    generative_task,
    get_task,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

#: Points kept in `metrics.loss_history`: every step's loss up to this many steps, else the
#: mean of each of this many equal buckets (`inspect --plot` draws them).
LOSS_HISTORY_POINTS = 1000
#: Cuts of a squeeze without --squeeze-steps.
SQUEEZE_STEPS = 3
#: `final_loss` is the mean loss of the last 1/FINAL_LOSS_BUCKETS of the steps.
FINAL_LOSS_BUCKETS = 20
#: Methods `--mode` names (its older spelling of `--method`).
MODE_ALIASES = ("full", "lightweight", "overparam")


class TrainOptions(StageOptions, LoopConfig, DataOptions, PushOptions):
    """Options of `train` (the CLI flags, one to one): the loop's (`LoopConfig`), the data
    (`DataOptions`: `data`, its config, split and columns; the eval data in the same columns),
    the method and its options (None: the method's default, see `methods/`)."""

    eval_data: str | None = Field(
        None, description="eval data (default with --eval-split: the --data set)"
    )
    eval_split: str | None = Field(None, description="split of the eval data (validation)")
    method: str = Field(description="a training method of methods/registry.py")
    mode: str | None = Field(None, exclude=True, description="older name of method")
    lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="peak learning rate (default: the method's)"
    )
    mpo_lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="learning rate of MPO cores (default lr)"
    )
    num_cores: int | None = Field(
        None, ge=2, le=64, description="cores of matrices decomposed during training"
    )
    lora_r: int | None = Field(None, ge=1, description="lora, dsee: rank of the update")
    lora_alpha: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="lora, dsee: alpha"
    )
    lora_dropout: float | None = Field(None, ge=0, lt=1, description="lora, dsee: input dropout")
    sparse_size: int | None = Field(
        None, ge=1, description="dsee: entries of the sparse update per matrix"
    )
    sparse_init: Literal["godec", "magnitude", "random"] | None = Field(
        None, description="dsee: how the support of the sparse update is chosen"
    )
    grad_mask_p: float | None = Field(
        None, ge=0, le=1, description="mpoe: probability of dropping the central core's gradient"
    )
    balance_coef: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="mpoe: weight of the load-balancing loss"
    )
    budget: int | str | None = Field(
        None,
        description="apet: elements that train; lora, adapter: sets rank / size; a method "
        "name: as many as that method would train with these options",
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_number(cls, value: object) -> object:
        """A whole number (as text too, from the CLI) of at least 1, or a method name."""
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError("must be at least 1")
        return value

    budget_seed: int | None = Field(None, ge=0, description="apet: seeds their choice")
    adapter_size: int | None = Field(None, ge=1, description="adapter: bottleneck width")
    num_virtual_tokens: int | None = Field(
        None, ge=1, le=4096, description="prompt-, prefix-tuning: length"
    )
    prompt_init: Literal["vocab", "random"] | None = Field(
        None, description="prompt-tuning: start from vocabulary embeddings or N(0, 1)"
    )
    prefix_init: Literal["vocab", "random"] | None = Field(
        None, description="prefix-tuning: start from vocabulary tokens' keys and values"
    )
    layers: list[str] | None = Field(None, description="PET methods: weight groups to adapt")
    target_modules: ModuleRegex = Field(None, description="PET methods: regex of module names")
    max_length: int = Field(128, ge=2)
    task: TaskName | None = Field(None, description="None: inferred from the data and model")
    generate: bool = Field(False, description="score exact match of greedy generations")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per row (--generate)")
    select_best: str | None = Field(
        None, description="keep the weights of the evaluation best by this metric, not the last"
    )
    dry_run: bool = Field(
        False, description="count what the method would train (meta device); write nothing"
    )
    resume: bool = False
    squeeze_to: float | None = Field(
        None, gt=0, lt=1, description="squeeze MPO bonds during training to this parameter ratio"
    )
    squeeze_rel_tol: float | None = Field(
        None, gt=0, lt=1, description="squeeze MPO bonds during training to this error bound"
    )
    squeeze_steps: int | None = Field(None, ge=1, description="cuts of the squeeze (3)")
    squeeze_until: float | None = Field(
        None, gt=0, lt=1, description="fraction of the run by which the last cut is made"
    )
    distill_alpha: float | None = Field(
        None, gt=0, le=1, description="squeeze: weight of distillation from the uncut model"
    )
    distill_temperature: float = Field(
        2.0, gt=0, allow_inf_nan=False, description="squeeze: softmax temperature of it"
    )
    dynamic: bool = False
    split_num: int | None = Field(None, ge=1)
    top_n: int | None = Field(None, ge=1)
    weight_types: list[str] | None = None

    @field_validator("eval_data", mode="before")
    @classmethod
    def _eval_path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    _split = field_validator("weight_types", "layers", mode="before")(comma_list)

    @model_validator(mode="before")
    @classmethod
    def _mode_is_method(cls, data: Any) -> Any:
        """`mode` names the method (full, lightweight, overparam) when `method` is not given."""
        if not isinstance(data, dict) or data.get("mode") is None:
            return data
        mode, method = data["mode"], data.get("method")
        if mode not in MODE_ALIASES:
            raise ValueError(f"--mode is one of {', '.join(MODE_ALIASES)}; other methods: --method")
        if method is not None and method != mode:
            raise ValueError(f"--mode {mode} and --method {method} disagree: give one of them")
        return {**data, "method": mode, "mode": None}

    @model_validator(mode="after")
    def _squeeze_target(self) -> TrainOptions:
        if self.squeeze_to is not None and self.squeeze_rel_tol is not None:
            raise ValueError("give --squeeze-to or --squeeze-rel-tol, not both")
        if self.squeeze_steps is not None and self.squeezing is None:
            raise ValueError("--squeeze-steps needs --squeeze-to or --squeeze-rel-tol")
        if self.squeeze_until is not None and self.squeezing is None:
            raise ValueError("--squeeze-until needs --squeeze-to or --squeeze-rel-tol")
        if self.distill_alpha is not None and self.squeezing is None:
            raise ValueError(
                "--distill-alpha distills from the model before squeezing: it needs "
                "--squeeze-to or --squeeze-rel-tol"
            )
        return self

    @property
    def squeezing(self) -> str | None:
        """The squeeze target's flag, or None without squeezing."""
        if self.squeeze_to is not None:
            return "--squeeze-to"
        return "--squeeze-rel-tol" if self.squeeze_rel_tol is not None else None

    @model_validator(mode="after")
    def _method_options(self) -> TrainOptions:
        """A registered training method; options it does not take are refused; without `lr`,
        the method's measured default (so the manifest records the rate used)."""
        if self.method not in method_names(training=True):
            raise ValueError(
                f"unknown method {self.method!r}: choose one of "
                f"{', '.join(method_names(training=True))}"
            )
        config = method_config(self.method, training=True)
        methods = [method_config(name) for name in method_names(training=True)]
        options = {o for c in methods for o in c.options() if o in type(self).model_fields}
        allowed = set(config.options())
        if isinstance(self.budget, str):  # --budget METHOD: that method's options count too
            if self.budget not in method_names(training=True):
                raise ValueError(
                    f"--budget {self.budget}: a number, or a training method "
                    f"({', '.join(method_names(training=True))})"
                )
            if "budget" not in allowed:
                raise ValueError(f"--budget is not an option of method {self.method}")
            allowed |= set(method_config(self.budget).options()) - {"lr", "budget"}
        for option in sorted(options - allowed):
            if getattr(self, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise ValueError(f"{flag} is not an option of method {self.method}")
        if self.lr is None:
            self.lr = config.default("lr")
        return self

    def method_config(self, method: str | None = None) -> MethodConfig:
        """The config of the method (or of `method`): its options given here, its defaults
        for the rest."""
        config = method_config(method or self.method, training=True)
        given = {k: getattr(self, k) for k in config.options()}
        if method is not None:  # another method's count (--budget METHOD): not its budget
            given.pop("budget", None)
        return config(**{k: v for k, v in given.items() if v is not None})

    @property
    def peak_lr(self) -> float:
        """`lr` as a float: validation has filled it in from the method's default."""
        assert self.lr is not None
        return self.lr


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during training; `partial` holds a checkpoint for `--resume`."""

    def __init__(self, partial: Path, step: int, checkpoint_step: int | None) -> None:
        at = f" of step {checkpoint_step}" if checkpoint_step is not None else ""
        super().__init__(f"interrupted at step {step}; the checkpoint{at} is kept in {partial}")
        self.partial = partial
        self.step = step
        self.checkpoint_step = checkpoint_step


@dataclass
class TrainResult:
    output: Path | None  # None for a dry run
    metrics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    is_main_process: bool = True
    resumed_from_step: int | None = None
    commit_url: str | None = None  # the Hub commit of `push_to_hub` (main process)


def train(
    model: str | Path,
    options: TrainOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> TrainResult:
    """Fine-tune `model` on labelled text; write the trained model as a new artifact.

    `options` or keyword arguments (the same names as the CLI flags) configure the stage.
    """
    opts = options or TrainOptions(**kwargs)  # type: ignore[arg-type]
    if opts.push_to_hub is not None:
        if opts.dry_run:
            raise UsageError(
                "--push-to-hub: a dry run writes nothing to push", hint="leave one of them out"
            )
        check_can_push(opts.push_to_hub)
    inp = open_input(model, opts)
    model_layout(inp.path, tensor_shapes(inp))  # config.json read, checked against the weights
    config = read_config(inp.path)
    columns = opts.columns(task=opts.task, generative=generative_task(config))
    train_data = opts.read_data(hub_cache=opts.cache_dir, columns=columns)
    task = get_task(train_data.task)
    task.check_training_data(train_data)
    if isinstance(opts.budget, str):  # --budget METHOD: what that method would train
        other = get_method(opts.method_config(opts.budget))
        counted = _dry_run(inp, other, task, train_data)
        spent = counted["trainable_params"] - counted["trainable_head"]
        opts = opts.model_copy(update={"budget": spent})
    method = get_method(opts.method_config())
    _check_source(method, inp, opts)
    eval_data = _read_eval_data(opts, train_data)
    if opts.generate:
        if not method.config.generates:
            raise UsageError(
                f"--generate: {method.name} models cannot generate (their virtual tokens need "
                "a cache that generation does not keep)",
                hint="train without --generate: evaluations give loss and perplexity",
            )
        check_generation(task, eval_data, "--eval-data")
    _best_selection(opts, task, eval_data, _is_dynamic(inp, opts))
    warnings = _data_warnings(train_data, opts)
    if opts.dry_run:
        return TrainResult(None, _dry_run(inp, method, task, train_data), warnings)

    with launch_accelerator(opts.precision, opts.device) as accelerator:
        if slow_bf16(accelerator):
            warnings.append(
                "--precision bf16: this CPU has no native bf16 kernels, so a step runs about "
                "18x slower than fp32 (it saves ~25% of activation memory); prefer fp32 here"
            )
        out, partial = _plan_in_main_process(accelerator, inp, opts)
        try:
            result = _train_with(
                accelerator,
                inp,
                opts,
                method,
                task,
                train_data,
                eval_data,
                warnings,
                progress,
                out,
                partial,
            )
        except BaseException:
            release_claim(out)  # a versioned directory claimed for this run, never published
            raise
    if opts.push_to_hub is not None and result.is_main_process:
        result.commit_url = push_folder(out, opts.push_to_hub, private=opts.private, stage="train")
    return result


def _plan_in_main_process(
    accelerator: Accelerator, inp: StageInput, opts: TrainOptions
) -> tuple[Path, Path]:
    """`_plan_output` in the main process (which claims a versioned directory), its result or
    its error handed to every other process, so that all of them use the same directories."""
    shared: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            shared[0] = _plan_output(inp, opts)
        except MposurgeonError as err:
            if accelerator.num_processes == 1:
                raise
            shared[0] = (str(err), err.hint, err.exit_code)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(shared)
    planned = shared[0]
    if isinstance(planned[0], str):  # the main process's error, re-raised in this one
        error = MposurgeonError(planned[0], planned[1])
        error.exit_code = planned[2]
        raise error
    return planned


def _train_with(
    accelerator: Accelerator,
    inp: StageInput,
    opts: TrainOptions,
    method: Method,
    task: Task,
    train_data: TextDataset,
    eval_data: TextDataset | None,
    warnings: list[str],
    progress: ProgressCallback | None,
    out: Path,
    partial: Path,
) -> TrainResult:
    """The training run of `train` once its inputs are read and its output planned, in every
    process of the launch: build the model, train it, write the artifact to `out`."""
    setup = training_model(
        inp.path,
        is_artifact=inp.manifest is not None,
        task=task,
        data=train_data,
        seed=opts.seed,
        verify=opts.verify_checksums,
    )
    net = setup.model
    records = _live_records(net, inp, warnings)
    dynamic = _is_dynamic(inp, opts)
    chosen = [] if dynamic else _chosen(net, inp)
    prepared = method.prepare(net, records, chosen)
    records.update(prepared)
    pruned, pruned_out = _pruning_masks(net, inp, method)
    keep_pruned(net, pruned)  # a `prune` input's zeros stay zeros
    for module, mask in _pruned_weights(pruned_out, prepared).items():
        method.keep_zeros(net, module, mask, prepared[module].kind)  # and so does any update
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(net, inp.path)
    collator = task.collator(setup.tokenizer, net)
    train_rows = task.encode(train_data, setup.tokenizer, opts.max_length)
    eval_rows = task.encode(eval_data, setup.tokenizer, opts.max_length) if eval_data else None
    run = TrainingRun(
        accelerator,
        net,
        train_rows,
        eval_rows,
        collator,
        opts,
        method,
        _evaluator(task, opts, setup, eval_data),
        progress=progress,
        checkpoint_dir=partial if opts.save_every else None,
        select_best=_best_selection(opts, task, eval_data, dynamic),
    )
    run.squeezer = _squeezer(opts, net, run.total_steps, task)
    hook = None
    if dynamic:
        hook = _dynamic_hook(
            net, inp, opts, records, train_rows, collator, run.num_epochs, train_data.record()
        )
        run.hook = hook
        warnings += hook.schedule_warnings(run.num_epochs)
    state, resumed_from = _run_with_checkpoints(accelerator, run, inp, opts, partial)
    if hook is not None:
        records.update(hook.records())
    metrics = _metrics(
        opts, task, run, state, net, records, accelerator.num_processes, resumed_from
    )
    metrics["precision"] = precision_of(accelerator)
    metrics.update(method.training_metrics(net))
    if run.squeezer is not None:
        metrics["squeeze"] = _squeeze_metrics(run.squeezer, net)
    metrics["data"] = {
        "train": train_data.record(),
        "eval": eval_data.record() if eval_data is not None else None,
    }
    if accelerator.is_main_process:
        selection = hook.selection() if hook is not None else carried_selection(net, inp.selection)
        final = method.trained_records(net, records)
        tokenizer, masks = setup.tokenizer, (pruned, pruned_out)
        write_live_model(
            out, method, net, tokenizer, inp, opts, final, metrics, selection, masks, stage="train"
        )
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return TrainResult(
        output=out,
        metrics=metrics,
        warnings=warnings,
        is_main_process=accelerator.is_main_process,
        resumed_from_step=resumed_from,
    )


def _run_with_checkpoints(
    accelerator: Accelerator, run: TrainingRun, inp: StageInput, opts: TrainOptions, partial: Path
) -> tuple[LoopState, int | None]:
    """Run the loop, from the checkpoint in `partial` with `--resume`; return the final state
    and the step resumed from. On failure, `partial` is kept only if it holds a checkpoint to
    resume from (not after a divergence of a fresh run: resuming would diverge again), and an
    interruption says where it is."""
    resumed_from = None
    try:
        if opts.resume:
            with start_over_hint(partial):
                run.restore(partial / CHECKPOINT)
            resumed_from = run.state.step
        elif opts.save_every and accelerator.is_main_process:
            start_partial(partial, _run_record(inp, opts))
        accelerator.wait_for_everyone()
        return run.run(), resumed_from
    except BaseException as exc:
        kept = (partial / CHECKPOINT).is_dir()
        diverged = isinstance(exc, TrainingDiverged)
        if diverged and not opts.resume:
            kept = False  # its checkpoints would diverge again: resume takes the same steps
        if accelerator.is_main_process and not kept:
            shutil.rmtree(partial, ignore_errors=True)  # nothing to resume from: leave nothing
        if kept and isinstance(exc, KeyboardInterrupt):
            raise TrainingInterrupted(partial, run.state.step, run.checkpoint_step) from exc
        if diverged:
            where = f" (the checkpoint resumed from is kept in {partial})" if kept else ""
            raise TrainingDiverged(f"{exc}; nothing was written{where}", exc.hint) from None
        raise


def _dry_run(inp: StageInput, method: Method, task: Task, data: TextDataset) -> dict[str, Any]:
    """What `method` would train on the model of `inp`, counted on the `meta` device: the
    model is built from its config (no weight is read), the method prepares it and marks its
    trainable set. An input with MPO modules is refused (their cores are not in the config)."""
    import torch

    if inp.modules:
        raise UsageError(
            f"counting a method's parameters from the config alone (--dry-run, --budget "
            f"METHOD) needs a checkpoint, and {inp.path} has MPO modules, whose cores only its "
            "files hold",
            hint="count on the checkpoint it came from, or give --budget as a number",
        )
    config = read_config(inp.path)
    check_model_task(config, task, inp.path)
    task.configure(config, data)
    with torch.device("meta"), quiet_transformers():
        net = model_class(config, task.head).from_config(config)
    records = method.prepare(net, {}, [])
    method.set_trainable(net)
    count = count_parameters(net)
    return {
        "dry_run": True,
        "method": method.name,
        "method_options": method.config.model_dump(mode="json"),
        "task": task.name,
        "trainable_params": count.trainable,
        "trainable_head": count.trainable_head,
        "total_params": count.total,
        "modules": len(records),
    }


# -- checks ----------------------------------------------------------------------------------


def _check_squeeze(method: Method, inp: StageInput, opts: TrainOptions, dynamic: bool) -> None:
    """Refuse a squeeze the run cannot do: a method that does not train MPO cores, an input
    without MPO modules, dynamic selection (its modules change during the run)."""
    flag = opts.squeezing
    if not method.config.squeezes:
        able = [m for m in method_names(training=True) if method_config(m).squeezes]
        raise UsageError(
            f"{flag} cuts the bonds of MPO cores that train, not those of --method {method.name}",
            hint=f"train with --method {' or '.join(able)}",
        )
    if not inp.mpo_modules:
        raise UsageError(
            f"{flag}: {inp.path} has no MPO modules to squeeze",
            hint=f"decompose it first: mposurgeon decompose {inp.path}",
        )
    if opts.select_best is not None:
        raise UsageError(
            f"{flag} with --select-best: the best evaluation's weights may have the shapes of "
            "before a cut",
            hint="squeeze without --select-best (each cut logs the eval metrics around it)",
        )
    if dynamic:
        raise UsageError(
            f"{flag} cannot squeeze while --dynamic selection decomposes more matrices",
            hint="select first (mposurgeon select), or squeeze in a later run",
        )


def _squeeze_metrics(squeezer: Squeezer, net: nn.Module) -> dict[str, Any]:
    """The squeeze's schedule, its cuts, the MPO parameter ratio it reached and the bonds it
    planned for each module (at the first cut)."""
    schedule = squeezer.schedule
    start = squeezer.start_params or 0
    final = sum(p.numel() for cores in mpo_cores(net).values() for p in cores.core)
    return {
        "cuts": schedule.cuts,
        "steps": schedule.steps(),
        "target": {"ratio": schedule.ratio} if schedule.ratio else {"rel_tol": schedule.rel_tol},
        "start_params": start,
        "final_params": final,
        "ratio": final / start if start else None,
        "log": [c.to_dict() for c in squeezer.cuts],
        "final_bonds": squeezer.plan.to_dict()["final"] if squeezer.plan is not None else None,
    }


def _squeezer(opts: TrainOptions, net: nn.Module, total_steps: int, task: Task) -> Squeezer | None:
    """The squeeze of this run (None without one); refuses a target below every bond 1, or a
    run too short for its cuts."""
    if opts.squeezing is None:
        return None
    cuts = opts.squeeze_steps or SQUEEZE_STEPS
    until = opts.squeeze_until if opts.squeeze_until is not None else SQUEEZE_UNTIL
    try:
        schedule = SqueezeSchedule(total_steps, cuts, opts.squeeze_to, opts.squeeze_rel_tol, until)
    except ValueError:
        raise UsageError(
            f"--squeeze-steps {cuts} by {until:g} of the run need separate optimizer steps "
            f"before the end; this run has {total_steps}",
            hint="train longer (--epochs, --max-steps), cut fewer times or later",
        ) from None
    if opts.squeeze_to is not None and opts.squeeze_to < (floor := reachable_ratio(net)):
        raise UsageError(
            f"--squeeze-to {opts.squeeze_to} is out of reach: with every bond 1 the MPO "
            f"modules keep {floor:.3g} of their parameters",
            hint=f"choose a ratio of at least {floor:.3g}",
        )
    if opts.distill_alpha is not None and task.name == "regression":
        raise UsageError(
            "--distill-alpha matches class or token distributions; a regression head has none",
            hint="squeeze without --distill-alpha",
        )
    distillation = None
    if opts.distill_alpha is not None:
        distillation = Distillation(opts.distill_alpha, opts.distill_temperature)
    return Squeezer(schedule, distillation=distillation)


def _check_source(method: Method, inp: StageInput, opts: TrainOptions) -> None:
    """Refuse what the input cannot train, before any work: the dynamic-selection flags, then
    the method's own checks."""
    if not opts.dynamic and (opts.split_num is not None or opts.top_n is not None):
        raise UsageError(
            "--split-num and --top-n choose matrices during training: they need --dynamic",
            hint="add --dynamic (with --method overparam), or use `mposurgeon select` first",
        )
    if opts.dynamic and not method.config.selects_dynamically:
        able = [m for m in method_names(training=True) if method_config(m).selects_dynamically]
        raise UsageError(
            f"--dynamic selects matrices for over-parameterized training, not --method "
            f"{method.name}",
            hint=f"use --method {able[0]} --dynamic --split-num K --top-n N",
        )
    selection = inp.selection
    dynamic = _is_dynamic(inp, opts)
    chosen = [] if dynamic or selection is None else selection.chosen
    method.check_source(TrainingSource(str(inp.path), inp.modules, chosen, dynamic))
    if dynamic:
        _dynamic_plan(opts).resolve(selection)
    if opts.squeezing is not None:
        _check_squeeze(method, inp, opts, dynamic)


def _is_dynamic(inp: StageInput, opts: TrainOptions) -> bool:
    """--dynamic, or a method that selects dynamically on a `select` artifact whose selection
    has several rounds."""
    rounds = (inp.selection.split_num if inp.selection is not None else None) or 1
    return opts.dynamic or (method_config(opts.method).selects_dynamically and rounds > 1)


def _read_eval_data(opts: TrainOptions, train_data: TextDataset) -> TextDataset | None:
    """`--eval-data` (with only `--eval-split`: the `--data` set) in the training labels; a
    DatasetDict or data set id gives its `validation` split unless `--eval-split` names one.
    `--data-config` applies to it when it is the `--data` set or another data set id."""
    spec = opts.eval_data or (opts.data if opts.eval_split is not None else None)
    if spec is None:
        return None
    same_set = spec == opts.data or not Path(spec).exists()
    data = read_dataset(
        spec,
        config=opts.data_config if same_set else None,
        split=opts.eval_split,
        default_split=DEFAULT_EVAL_SPLIT,
        columns=opts.columns(task=train_data.task),
        hub_cache=opts.cache_dir,
    )
    return data.with_labels(train_data.labels) if get_task(data.task).has_classes else data


def _best_selection(
    opts: TrainOptions, task: Task, eval_data: TextDataset | None, dynamic: bool
) -> BestSelection | None:
    """`--select-best METRIC`, checked: a metric of the task, eval data to score, and a model
    whose structure does not change during training (dynamic selection changes it)."""
    if opts.select_best is None:
        return None
    metrics = [m for m in task.metrics if m != "tokens"]
    metrics += ["exact_match"] if opts.generate else []
    if opts.select_best not in metrics:
        raise UsageError(
            f"--select-best {opts.select_best}: {task.name} evaluations report "
            f"{', '.join(metrics)}",
            hint="pick one of them"
            + ("" if opts.generate or not task.generates else " (exact_match needs --generate)"),
        )
    if eval_data is None:
        raise UsageError(
            "--select-best keeps the weights of the best evaluation: there is no eval data",
            hint="pass --eval-data (and --eval-every N to evaluate during training)",
        )
    if dynamic:
        raise UsageError(
            "--select-best cannot go back across the rounds of --dynamic selection: each "
            "round changes which matrices are MPO",
            hint="leave --select-best out, or select statically with `mposurgeon select`",
        )
    return BestSelection(opts.select_best, opts.select_best in task.maximize)


def _evaluator(
    task: Task, opts: TrainOptions, setup: ModelSetup, eval_data: TextDataset | None
) -> Evaluator:
    """The run's evaluator: the task's metrics, and with `--generate` exact match."""
    generation = generation_for(opts, task, eval_data, setup.tokenizer)

    def evaluator(accelerator: Accelerator, model: nn.Module, loader: Any) -> dict[str, float]:
        return evaluate(accelerator, model, loader, task, generation=generation)

    return evaluator


def _data_warnings(data: TextDataset, opts: TrainOptions) -> list[str]:
    if opts.batch_size > len(data):
        return [
            f"--batch-size {opts.batch_size} is larger than the training data ({len(data)} rows): "
            "every step sees all of it"
        ]
    return []


# -- output and resume -----------------------------------------------------------------------


def _run_record(inp: StageInput, opts: TrainOptions) -> dict[str, Any]:
    return run_record(inp.path, stage_options_record(opts))


def _plan_output(inp: StageInput, opts: TrainOptions) -> tuple[Path, Path]:
    """The artifact directory and its `.partial` sibling; with resume, those of the run found."""
    if not opts.resume:
        out = plan_output(inp, opts, "train")
        partial = partial_of(out)
        if partial.exists() and not opts.overwrite:
            raise UsageError(
                f"an interrupted run left {partial}",
                hint="pass --resume to continue it, or --overwrite to start over",
            )
        return out, partial
    if opts.output is not None:
        out = opts.output
    else:
        out = latest_partial_output(version_parent(opts.workdir, inp.base.name), inp.path)
    check_output_dir(out, inputs=[inp.path], overwrite=opts.overwrite)
    partial = partial_of(out)
    check_resumable(partial, _run_record(inp, opts))
    return out, partial


# -- pruning masks ------------------------------------------------------------------------------


def _pruning_masks(
    net: nn.Module, inp: StageInput, method: Method
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The input's pruning masks (`M.prune.<param>_mask`, written by `prune`): those of
    parameters the live model trains or holds directly, by live parameter name (kept at zero by
    `keep_pruned`), and every mask of a module the model has, by the key the output stores it
    under (so that `merge` zeroes the merged weight, e.g. a LoRA W + BA, there too)."""
    with open_tensors(inp.path) as reader:
        keys = [k for k in reader.keys() if masked_key(k) is not None]
        if not keys:
            return {}, {}
        live = {method.file_key(name): name for name, _ in net.named_parameters()}
        zeroed: dict[str, Tensor] = {}
        kept: dict[str, Tensor] = {}
        for key in keys:
            module, _, param = str(masked_key(key)).rpartition(".")
            try:
                name = f"{resolve_module_name(net, module)}.{param}"
            except KeyError:
                continue  # a module the model lacks (an untied LM head): left out with it
            mask = reader.get(key).bool()
            kept[mask_key(name)] = mask
            if name in live:
                zeroed[live[name]] = mask
    return zeroed, kept


def _pruned_weights(
    kept: Mapping[str, Tensor], records: Mapping[str, ModuleRecord]
) -> dict[str, Tensor]:
    """The weight masks of `kept` (`_pruning_masks`) of the modules in `records` (those the
    method transformed; `load_model` handled the input's), by live module name."""
    out: dict[str, Tensor] = {}
    for key, mask in kept.items():
        module, _, param = str(masked_key(key)).rpartition(".")
        if param == "weight" and module in records:
            out[module] = mask
    return out


# -- module records and selection --------------------------------------------------------------


def _live_records(net: nn.Module, inp: StageInput, warnings: list[str]) -> dict[str, ModuleRecord]:
    """The input's module records under the live model's names; a module the classifier
    lacks (an untied LM head) is dropped, with a warning."""
    records: dict[str, ModuleRecord] = {}
    for rec in inp.modules.values():
        try:
            live = resolve_module_name(net, rec.name)
        except KeyError:
            warnings.append(f"{rec.name} is not part of {type(net).__name__}: left out")
            continue
        records[live] = rec.model_copy(update={"name": live, "weight_key": f"{live}.weight"})
    return records


def _chosen(net: nn.Module, inp: StageInput) -> list[str]:
    """The matrices a `select` stage chose, under the live model's names."""
    chosen = inp.selection.chosen if inp.selection is not None else []
    return [resolve_module_name(net, name) for name in chosen]


def _dynamic_plan(opts: TrainOptions) -> DynamicPlan:
    return DynamicPlan(opts.top_n, opts.split_num, opts.weight_types)


def _dynamic_hook(
    net: nn.Module,
    inp: StageInput,
    opts: TrainOptions,
    records: dict[str, ModuleRecord],
    rows: list[dict[str, Any]],
    collator: Any,
    epochs: int,
    data: dict[str, Any],
) -> DynamicSelection:
    """The dynamic-selection hook of this run (training/dynamic.py); its selection records
    `data`, what scored it (`TextDataset.record`)."""
    return dynamic_selection(
        net,
        _dynamic_plan(opts),
        inp.selection,
        records=records,
        rows=rows,
        collator=collator,
        epochs=epochs,
        batch_size=opts.batch_size,
        num_cores=opts.method_config().num_cores,  # type: ignore[attr-defined]
        info={"seed": opts.seed, "data": data},
    )


# -- metrics ---------------------------------------------------------------------------------


def _metrics(
    opts: TrainOptions,
    task: Task,
    run: TrainingRun,
    state: LoopState,
    net: nn.Module,
    records: dict[str, ModuleRecord],
    num_processes: int,
    resumed_from: int | None,
) -> dict[str, Any]:
    """The manifest's `metrics`. `loss_history` holds (step, mean loss of the steps since
    the previous point); `final_loss` is the mean training loss of the last ceil(steps / 20)
    steps; `eval_<metric>` are the task's figures of the last evaluation."""
    losses = state.losses
    size = max(1, math.ceil(len(losses) / LOSS_HISTORY_POINTS))
    history = [
        {"step": i + len(chunk), "loss": sum(chunk) / len(chunk)}
        for i in range(0, len(losses), size)
        for chunk in [losses[i : i + size]]
    ]
    last = losses[-max(1, math.ceil(len(losses) / FINAL_LOSS_BUCKETS)) :]
    count = count_parameters(net)
    last_eval = state.evals[-1] if state.evals else {}
    if state.best_step is not None:  # the evaluation of the weights kept
        last_eval = next(e for e in state.evals if e["step"] == state.best_step)
    names = [*task.metrics, *(["exact_match"] if opts.generate else [])]
    config = opts.method_config()
    return {
        "method": opts.method,
        "task": task.name,
        "steps": state.step,
        "epochs": round(state.step / max(run.steps_per_epoch, 1), 3),
        "final_loss": sum(last) / len(last) if losses else None,
        "loss_history": history,
        "eval": state.evals,
        **{f"eval_{name}": last_eval.get(name) for name in names},
        "best_metric": opts.select_best,
        "best_step": state.best_step,
        "trainable_params": count.trainable,
        "trainable_head": count.trainable_head,
        "total_params": count.total,
        "trainable_fraction": count.fraction,
        "seed": opts.seed,
        "lr": opts.peak_lr,
        "method_options": config.model_dump(mode="json"),
        "batch_size": opts.batch_size,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "num_processes": num_processes,
        "train_rows": len(run.train_rows),
        "eval_rows": len(run.eval_rows or []),
        "resumed_from_step": resumed_from,
        "modules": len(records),
    }
