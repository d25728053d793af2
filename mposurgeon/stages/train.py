"""train: fine-tune a checkpoint or artifact for sequence classification, in factorized form.

The story: resolve the input and read the data (labels from the training file); check the mode
against the input (`lightweight` needs MPO modules; `overparam` needs MPO modules, a `select`
choice, or `--dynamic`); build the *ForSequenceClassification model with MPO layers in place
and a seeded head (a pad token for GPT-2, Llama, BLOOM); for `overparam` on a `select`
artifact, decompose the chosen matrices losslessly in place; train (training/loop.py) with
periodic checkpoints in `<out>.partial/`; write the trained model as an artifact.

The output artifact holds the model under its LIVE state-dict names
(`bert.encoder.layer.0.intermediate.dense.mpo.core.2`, `classifier.weight`), tied tensors once;
module records are re-keyed to those names, with `trainable` = the trained core indices,
bonds and parameter counts of the trained cores, and `rel_error` (and `predicted_error`,
`entropy`) None/empty: they measured a decomposition against the matrix it factorized, and the
trained cores no longer represent that matrix (merge reproduces the trained weights from the
cores exactly).
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
error names the option. The input must ship tokenizer files (training a new empty vocabulary
would map every word to the unknown token), and the tokenizer must know some of the words of
the data.

Multi-process (`accelerate launch`, `torchrun`): every process runs this function; only the main
process writes files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from mposurgeon.artifact.manifest import ModuleRecord
from mposurgeon.artifact.store import (
    atomic_directory,
    check_output_dir,
    release_claim,
    sha256_file,
    version_parent,
)
from mposurgeon.artifact.tensors import ShardedWriter
from mposurgeon.errors import MposurgeonError, UsageError
from mposurgeon.models.groups import MODEL_TYPE_ALIASES, group_of
from mposurgeon.models.surgery import resolve_module_name
from mposurgeon.mpo.metrics import bonds_of, num_params
from mposurgeon.stages.common import (
    ProgressCallback,
    StageInput,
    StageOptions,
    finish_artifact,
    model_layout,
    open_input,
    plan_output,
    stage_options_record,
    tensor_shapes,
)
from mposurgeon.stages.decompose import mpo_record
from mposurgeon.training.data import TextDataset, encode, read_dataset
from mposurgeon.training.defaults import DEFAULT_LR
from mposurgeon.training.loop import (
    CHECKPOINT,
    DamagedCheckpoint,
    LoopConfig,
    LoopState,
    TrainingDiverged,
    TrainingRun,
    launch_accelerator,
    model_inputs,
    reading_checkpoint,
)
from mposurgeon.training.model import classification_model
from mposurgeon.training.params import (
    LiveDecomposition,
    Mode,
    count_parameters,
    decompose_in_place,
    mpo_cores,
    mpo_structure,
    trained_core_indices,
    unique_state_dict,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

#: Weight types that dynamic selection scores (the OPF paper's).
DYNAMIC_WEIGHT_TYPES = ("FFN_1", "FFN_2", "attention")
#: Batches of training data that one Fisher scoring round looks at.
FISHER_MAX_BATCHES = 64
#: The largest seed: `numpy.random.seed` (which accelerate's `set_seed` calls) takes 0..2**32-1.
MAX_SEED = 2**32 - 1
#: Points kept in `metrics.loss_history`.
LOSS_HISTORY_POINTS = 20
#: Options that may differ between an interrupted run and its `--resume`.
_RESUME_FREE = {
    "resume",
    "overwrite",
    "output",
    "workdir",
    "verify_checksums",
    "offline",
    "cache_dir",
    "max_shard_size",
    "save_every",
    "eval_every",
}


class TrainOptions(StageOptions):
    """Options of `train` (the CLI flags, one to one). Steps are optimizer steps. Every float
    is finite (an infinite learning rate or decay would train NaN weights)."""

    data: Path = Field(description="training data: .jsonl or .csv with text and label")
    eval_data: Path | None = None
    mode: Mode = Field(description="lightweight (MPOP), overparam (OPF) or full")
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N steps (overrides epochs)")
    lr: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="peak learning rate (default: the mode's, training/defaults.py DEFAULT_LR)",
    )
    mpo_lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="learning rate of MPO cores (default lr)"
    )
    batch_size: int = Field(16, ge=1, description="rows per batch and process")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    max_length: int = Field(128, ge=2)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="NumPy takes seeds below 2**32")
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    resume: bool = False
    dynamic: bool = False
    split_num: int | None = Field(None, ge=1)
    top_n: int | None = Field(None, ge=1)
    weight_types: list[str] | None = None
    num_cores: int = Field(5, ge=2, le=64, description="cores of matrices decomposed here")

    @field_validator("weight_types", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _mode_lr(self) -> TrainOptions:
        """Without `lr`, the mode's measured default (so the manifest records the rate used)."""
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        return self

    @property
    def peak_lr(self) -> float:
        """`lr` as a float: validation has filled it in from the mode's default."""
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
    output: Path
    metrics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    is_main_process: bool = True
    resumed_from_step: int | None = None


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
    inp = open_input(model, opts)
    model_layout(inp.path, tensor_shapes(inp))  # config.json read, checked against the weights
    _check_mode(inp, opts)
    train_data = read_dataset(opts.data)
    if len(train_data.labels) < 2:
        raise UsageError(
            f"{opts.data} holds a single label ({train_data.labels[0]!r}): nothing to classify",
            hint="the training data needs at least two labels",
        )
    eval_data = (
        read_dataset(opts.eval_data).with_labels(train_data.labels) if opts.eval_data else None
    )
    warnings = _data_warnings(train_data, opts)

    with launch_accelerator() as accelerator:
        out, partial = _plan_in_main_process(accelerator, inp, opts)
        try:
            return _train_with(
                accelerator, inp, opts, train_data, eval_data, warnings, progress, out, partial
            )
        except BaseException:
            release_claim(out)  # a versioned directory claimed for this run, never published
            raise


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
    train_data: TextDataset,
    eval_data: TextDataset | None,
    warnings: list[str],
    progress: ProgressCallback | None,
    out: Path,
    partial: Path,
) -> TrainResult:
    """The training run of `train` once its inputs are read and its output planned, in every
    process of the launch: build the model, train it, write the artifact to `out`."""
    setup = classification_model(
        inp.path,
        is_artifact=inp.manifest is not None,
        labels=train_data.labels,
        seed=opts.seed,
        verify=opts.verify_checksums,
    )
    net = setup.model
    records = _live_records(net, inp, warnings)
    dynamic = _is_dynamic(inp, opts)
    if opts.mode == "overparam" and not dynamic:
        records.update(_decompose_selection(net, inp, records, opts.num_cores))
    collator = DataCollatorWithPadding(setup.tokenizer)
    train_rows = encode(train_data, setup.tokenizer, opts.max_length)
    eval_rows = encode(eval_data, setup.tokenizer, opts.max_length) if eval_data else None
    run = TrainingRun(
        accelerator,
        net,
        train_rows,
        eval_rows,
        collator,
        _loop_config(opts),
        progress=progress,
        checkpoint_dir=partial if opts.save_every else None,
    )
    hook = None
    if dynamic:
        hook = _dynamic_selection(net, inp, opts, records, train_rows, collator, run.num_epochs)
        run.hook = hook
        warnings += hook.schedule_warnings(run.num_epochs)
    resumed_from = None
    try:
        if opts.resume:
            with _start_over_hint(partial):
                run.restore(partial / CHECKPOINT)
            resumed_from = run.state.step
        elif opts.save_every and accelerator.is_main_process:
            _start_partial(partial, inp, opts)
        accelerator.wait_for_everyone()
        state = run.run()
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
    if hook is not None:
        records.update(hook.records())
    metrics = _metrics(opts, run, state, net, accelerator.num_processes, resumed_from)
    if accelerator.is_main_process:
        selection = hook.selection() if hook is not None else _carried_selection(net, inp)
        _write_artifact(out, net, setup.tokenizer, inp, opts, records, metrics, selection)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return TrainResult(
        output=out,
        metrics=metrics,
        warnings=warnings,
        is_main_process=accelerator.is_main_process,
        resumed_from_step=resumed_from,
    )


# -- checks ----------------------------------------------------------------------------------


def _check_mode(inp: StageInput, opts: TrainOptions) -> None:
    """Refuse a mode the input cannot train, before any work."""
    has_mpo = bool(inp.mpo_modules)
    selection = inp.selection
    if not opts.dynamic and (opts.split_num is not None or opts.top_n is not None):
        raise UsageError(
            "--split-num and --top-n choose matrices during training: they need --dynamic",
            hint="add --dynamic (with --mode overparam), or use `mposurgeon select` first",
        )
    if opts.dynamic and opts.mode != "overparam":
        raise UsageError(
            f"--dynamic selects matrices for over-parameterized training, not --mode {opts.mode}",
            hint="use --mode overparam --dynamic --split-num K --top-n N",
        )
    if opts.mode == "lightweight" and not has_mpo:
        raise UsageError(
            f"--mode lightweight trains the auxiliary cores of MPO modules, and {inp.path} has "
            "none",
            hint=f"decompose it first: mposurgeon decompose {inp.path} --layers FFN_1,attention",
        )
    if opts.mode == "overparam" and not (
        has_mpo or opts.dynamic or (selection or {}).get("chosen")
    ):
        raise UsageError(
            f"--mode overparam trains MPO cores, and {inp.path} has no MPO modules and no "
            "selection",
            hint="decompose it, choose matrices with `mposurgeon select`, or pass "
            "--dynamic --split-num K --top-n N",
        )
    if _is_dynamic(inp, opts):
        _dynamic_plan(inp, opts)


def _data_warnings(data: TextDataset, opts: TrainOptions) -> list[str]:
    if opts.batch_size > len(data):
        return [
            f"--batch-size {opts.batch_size} is larger than the training data ({len(data)} rows): "
            "every step sees all of it"
        ]
    return []


def _is_dynamic(inp: StageInput, opts: TrainOptions) -> bool:
    """--dynamic, or overparam on a `select` artifact whose selection has several rounds."""
    selection = inp.selection or {}
    return opts.dynamic or (opts.mode == "overparam" and (selection.get("split_num") or 1) > 1)


def _loop_config(opts: TrainOptions) -> LoopConfig:
    return LoopConfig(
        mode=opts.mode,
        epochs=opts.epochs,
        max_steps=opts.max_steps,
        lr=opts.peak_lr,
        mpo_lr=opts.mpo_lr,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        warmup_ratio=opts.warmup_ratio,
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
        seed=opts.seed,
        eval_every=opts.eval_every,
        save_every=opts.save_every,
    )


# -- output and resume -----------------------------------------------------------------------


def _partial_of(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def _resume_record(inp: StageInput, opts: TrainOptions) -> dict[str, Any]:
    """What identifies a run for `--resume`: the input and the options that shape training."""
    options = {k: v for k, v in stage_options_record(opts).items() if k not in _RESUME_FREE}
    return {"input": str(Path(inp.path).resolve()), "options": options}


def _plan_output(inp: StageInput, opts: TrainOptions) -> tuple[Path, Path]:
    """The artifact directory and its `.partial` sibling; with resume, those of the run found."""
    if not opts.resume:
        out = plan_output(inp, opts, "train")
        partial = _partial_of(out)
        if partial.exists() and not opts.overwrite:
            raise UsageError(
                f"an interrupted run left {partial}",
                hint="pass --resume to continue it, or --overwrite to start over",
            )
        return out, partial
    if opts.output is not None:
        out = opts.output
        check_output_dir(out, inputs=[inp.path], overwrite=opts.overwrite)
    else:
        out = _latest_partial_output(inp, opts)
    partial = _partial_of(out)
    if not (partial / CHECKPOINT).is_dir():
        raise UsageError(
            f"nothing to resume: no checkpoint in {partial}",
            hint="run without --resume, with --overwrite if the directory exists (checkpoints "
            "are written with --save-every N)",
        )
    saved = _read_run_record(partial)
    expected = _resume_record(inp, opts)
    if saved["input"] != expected["input"]:
        raise UsageError(
            f"{partial} is a run on {saved['input']}, not on {expected['input']}",
            hint="resume with the input of the interrupted run",
        )
    changed = sorted(
        k
        for k in set(saved["options"]) | set(expected["options"])
        if saved["options"].get(k) != expected["options"].get(k)
    )
    if changed:
        raise UsageError(
            f"options differ from the interrupted run in {partial}: {', '.join(changed)}",
            hint="resume with the same training options (--save-every, --eval-every, output "
            "and cache options may change)",
        )
    return out, partial


def _latest_partial_output(inp: StageInput, opts: TrainOptions) -> Path:
    """The newest `v<N>-train` of this input whose `.partial` directory holds a checkpoint."""
    parent = version_parent(opts.workdir, inp.base.name)
    pattern = re.compile(r"^v(\d+)-train\.partial$")
    found = []
    for child in parent.iterdir() if parent.is_dir() else []:
        match = pattern.match(child.name)
        if match and (child / "run.json").is_file():
            saved = _read_run_record(child)
            if saved["input"] == str(Path(inp.path).resolve()):
                found.append((int(match.group(1)), child))
    if not found:
        raise UsageError(
            f"nothing to resume: no interrupted train run of {inp.path} in {parent}",
            hint="pass -o with the output of the interrupted run",
        )
    partial = max(found)[1]
    out = partial.parent / partial.name.removesuffix(".partial")
    check_output_dir(out, inputs=[inp.path], overwrite=opts.overwrite)
    return out


def _read_run_record(partial: Path) -> dict[str, Any]:
    """`<partial>/run.json` (see `_resume_record`); a `DamagedCheckpoint` when it is missing or
    not such a record."""
    file = partial / "run.json"
    with _start_over_hint(partial), reading_checkpoint(file):
        saved = json.loads(file.read_text(encoding="utf-8"))
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("input"), str)
        and isinstance(saved.get("options"), dict)
    ):
        raise DamagedCheckpoint(
            file, 'is not a run record {"input": ..., "options": ...}', _START_OVER.format(partial)
        )
    return saved


_START_OVER = "start over: run the same command with --overwrite instead of --resume, or delete {}"


@contextmanager
def _start_over_hint(partial: Path) -> Iterator[None]:
    """Give a `DamagedCheckpoint` raised in the body the hint of how to start over."""
    try:
        yield
    except DamagedCheckpoint as exc:
        exc.hint = _START_OVER.format(partial)
        raise


def _start_partial(partial: Path, inp: StageInput, opts: TrainOptions) -> None:
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    record = json.dumps(_resume_record(inp, opts), indent=2)
    (partial / "run.json").write_text(record + "\n", encoding="utf-8")


def _write_artifact(
    out: Path,
    net: nn.Module,
    tokenizer: Any,
    inp: StageInput,
    opts: TrainOptions,
    records: dict[str, ModuleRecord],
    metrics: dict[str, Any],
    selection: dict[str, Any] | None,
) -> None:
    """The trained model (live names, tied tensors once), its config and tokenizer, manifest."""
    config = net.config  # type: ignore[attr-defined]
    config.architectures = [type(net).__name__]
    with atomic_directory(out, overwrite=opts.overwrite) as tmp:
        tensors, _ = unique_state_dict(net)
        with ShardedWriter(tmp, opts.max_shard_size) as writer:
            for key, tensor in tensors.items():
                writer.add(key, tensor)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        finish_artifact(
            tmp,
            inp=inp,
            stage="train",
            options=opts,
            modules=_final_records(net, records),
            known_checksums=writer.checksums(),
            metrics=metrics,
            selection=selection,
        )


# -- module records --------------------------------------------------------------------------


def _live_records(net: nn.Module, inp: StageInput, warnings: list[str]) -> dict[str, ModuleRecord]:
    """The input's module records under the live model's names; a module the classifier
    lacks (an untied LM head) is dropped, with a warning."""
    present = set(mpo_cores(net))
    records: dict[str, ModuleRecord] = {}
    for rec in inp.mpo_modules.values():
        try:
            live = resolve_module_name(net, rec.name)
        except KeyError:
            live = None
        if live not in present:
            warnings.append(f"{rec.name} is not part of {type(net).__name__}: left out")
            continue
        records[live] = rec.model_copy(update={"name": live, "weight_key": f"{live}.weight"})
    return records


def _record(dec: LiveDecomposition) -> ModuleRecord:
    """The record of a matrix decomposed here (measured error of the decomposition)."""
    return mpo_record(
        name=dec.name,
        kind=dec.kind,
        weight_key=f"{dec.name}.weight",
        weight_shape=dec.weight_shape,
        dtype=dec.dtype,
        shape=dec.shape,
        cores=dec.cores,
        spectra=dec.spectra,
        rel_error=dec.rel_error,
        predicted_error=dec.predicted_error,
        tied_keys=[f"{t}.weight" for t in dec.tied_names],
    )


def _final_records(net: nn.Module, records: dict[str, ModuleRecord]) -> dict[str, ModuleRecord]:
    """Records of the trained MPOs: trained core indices, bonds and sizes of the cores as they
    are now, live tied keys. No reconstruction error (see the module doc) and no bond entropy:
    both described the decomposition, not the trained cores (canonical spectra of those cost
    an SVD sweep per matrix; `inspect --plot` draws them)."""
    trained = trained_core_indices(net)
    structure = mpo_structure(net)
    final: dict[str, ModuleRecord] = {}
    for name, cores in mpo_cores(net).items():
        tensors = [c.detach().cpu() for c in cores.core]
        final[name] = records[name].model_copy(
            update={
                "trainable": trained[name],
                "bonds": list(bonds_of(tensors)),
                "params": num_params(tensors),
                "entropy": [],  # not measured here: `inspect --plot` draws the spectra
                "rel_error": None,
                "predicted_error": None,
                "tied_keys": [f"{t}.weight" for t in structure[name]["tied"]],
            }
        )
    return final


# -- over-parameterized selection ------------------------------------------------------------


def _decompose_selection(
    net: nn.Module, inp: StageInput, records: dict[str, ModuleRecord], num_cores: int
) -> dict[str, ModuleRecord]:
    """Decompose in place the matrices a `select` stage chose that are not MPO yet."""
    selection = inp.selection
    chosen = [resolve_module_name(net, n) for n in (selection or {}).get("chosen", [])]
    todo = [n for n in chosen if n not in records]
    return {d.name: _record(d) for d in decompose_in_place(net, todo, num_cores)}


def _carried_selection(net: nn.Module, inp: StageInput) -> dict[str, Any] | None:
    """The input's selection with module names re-keyed to the live names."""
    selection = inp.selection
    if not selection:
        return None

    def live(name: str) -> str:
        try:
            return resolve_module_name(net, name)
        except KeyError:
            return name

    carried = dict(selection)
    for key in ("scores", "patterns"):
        if isinstance(carried.get(key), dict):
            carried[key] = {live(k): v for k, v in carried[key].items()}
    if isinstance(carried.get("chosen"), list):
        carried["chosen"] = [live(n) for n in carried["chosen"]]
    return carried


class DynamicSelection:
    """OPF's dynamic selection (ALGORITHMS.md section 3), as an epoch hook of the loop.

    K = `split_num` rounds at epochs 0, ceil(E/K), 2 ceil(E/K), ...: score the dense matrices
    of the weight types with Fisher on the current model (training/importance.py), choose
    `top_n / K` more per weight pattern, skipping those already chosen (and those MPO in the
    input), and decompose them losslessly in place; the loop then rebuilds optimizer and
    scheduler so that the new cores train (the research code forgets this). Round 0 may be
    given (`round0`: a `select` artifact's choice); every process decomposes the main
    process's choice. The manifest's `selection` follows the `select` stage's schema, with all
    rounds filled in; `scores` holds each matrix's latest score.
    """

    def __init__(
        self,
        *,
        model_type: str,
        weight_types: list[str],
        top_n: int,
        split_num: int,
        epochs: int,
        rows: list[dict[str, Any]],
        collator: Any,
        batch_size: int,
        num_cores: int,
        already: list[str],
        round0: list[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
        self.weight_types = weight_types
        self.top_n = top_n
        self.split_num = split_num
        self.epochs = epochs
        self.interval = math.ceil(epochs / split_num)
        self.rows = rows
        self.collator = collator
        self.batch_size = batch_size
        self.num_cores = num_cores
        self.already = list(already)
        self.round0 = round0
        self.info = info or {}  # seed, data: recorded as they are
        self.rounds: list[dict[str, Any]] = []
        self.scores: dict[str, float] = {}
        self.patterns: dict[str, str] = {}
        self._records: dict[str, dict[str, Any]] = {}

    def schedule_warnings(self, epochs: int) -> list[str]:
        """A warning when fewer than K rounds fit in the epochs that will run."""
        rounds = len(range(0, epochs, self.interval))
        if rounds >= self.split_num:
            return []
        per_round = self.top_n // self.split_num
        return [
            f"only {rounds} of {self.split_num} selection rounds fit in {epochs} epochs "
            f"(one every {self.interval}): {rounds * per_round} of top-n {self.top_n} matrices "
            "per weight pattern will be decomposed"
        ]

    @property
    def chosen(self) -> list[str]:
        return [n for r in self.rounds for n in r["chosen"]]

    def _candidates(self, model: nn.Module) -> dict[str, str]:
        """Dense modules of the weight types (live name -> weight pattern)."""
        from mposurgeon.training.importance import weight_pattern

        found: dict[str, str] = {}
        for name, module in model.named_modules():
            if not isinstance(getattr(module, "weight", None), nn.Parameter):
                continue
            group = group_of(model, name)
            if group not in self.weight_types:
                continue
            pattern = weight_pattern(self.model_type, group, name)
            if pattern is not None:
                found[name] = pattern
        return found

    def __call__(self, epoch: int, model: nn.Module) -> bool:
        if epoch % self.interval or epoch // self.interval >= self.split_num:
            return False
        index = epoch // self.interval
        if index < len(self.rounds):
            return False  # ran before the checkpoint this run resumed from
        from accelerate.utils import broadcast_object_list

        from mposurgeon.training.importance import choose_top_n, fisher_scores

        candidates = self._candidates(model)
        skip = set(self.chosen) | set(self.already)
        names = [n for n in candidates if n not in skip]
        self.patterns.update({n: candidates[n] for n in names})
        if index == 0 and self.round0 is not None:
            new = list(self.round0)
        else:
            scores: dict[str, float] = {}
            if names:
                loader = DataLoader(
                    self.rows,  # type: ignore[arg-type]
                    batch_size=self.batch_size,
                    shuffle=False,
                    collate_fn=self.collator,
                    generator=torch.Generator(),  # leaves the global RNG (dropout) alone
                )
                batches = (model_inputs(model, b) for b in loader)
                scores = fisher_scores(model, batches, names, max_batches=FISHER_MAX_BATCHES)
            new = choose_top_n(scores, candidates, self.top_n // self.split_num, exclude=skip)
            shared = [(new, scores)]
            broadcast_object_list(shared)  # every process follows the main process's choice
            new, scores = shared[0]
            self.scores.update(scores)
        todo = [n for n in new if n in candidates]  # round0 names may be MPO already
        for dec in decompose_in_place(model, todo, self.num_cores):
            self._records[dec.name] = _record(dec).model_dump(mode="json")
        self.rounds.append({"round": index, "epoch": epoch, "chosen": new})
        return bool(todo)

    def records(self) -> dict[str, ModuleRecord]:
        """Records of the matrices decomposed by the rounds (errors of the decomposition)."""
        return {n: ModuleRecord.model_validate(r) for n, r in self._records.items()}

    def selection(self) -> dict[str, Any]:
        """The manifest's `selection` (the `select` stage's schema, every round filled in)."""
        rounds = [
            *self.rounds,
            *(
                {"round": k, "epoch": k * self.interval, "chosen": None}
                for k in range(len(self.rounds), self.split_num)
            ),
        ]
        return {
            "method": "fisher",
            "weight_types": self.weight_types,
            "top_n": self.top_n,
            "split_num": self.split_num,
            **self.info,
            "scores": self.scores,
            "patterns": self.patterns,
            "chosen": self.chosen,
            "schedule": {
                "split_num": self.split_num,
                "per_round": self.top_n // self.split_num,
                "epochs": self.epochs,
                "interval": self.interval,
                "rounds": rounds,
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "scores": self.scores,
            "patterns": self.patterns,
            "records": self._records,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]
        self.scores = state["scores"]
        self.patterns = state["patterns"]
        self._records = state["records"]


def _dynamic_plan(inp: StageInput, opts: TrainOptions) -> tuple[int, int, list[str]]:
    """(top_n, split_num, weight_types) of a dynamic run: the flags, else the input's
    selection; top_n must be a multiple of split_num."""
    selection = inp.selection or {}
    top_n = opts.top_n if opts.top_n is not None else selection.get("top_n")
    split_num = opts.split_num if opts.split_num is not None else selection.get("split_num") or 1
    weight_types = opts.weight_types or selection.get("weight_types") or list(DYNAMIC_WEIGHT_TYPES)
    if top_n is None or top_n % split_num:
        raise UsageError(
            f"--dynamic needs --top-n N divisible by --split-num K (got top-n {top_n}, "
            f"split-num {split_num})",
            hint="e.g. --dynamic --split-num 2 --top-n 4",
        )
    unknown = [w for w in weight_types if w not in DYNAMIC_WEIGHT_TYPES]
    if unknown:
        raise UsageError(
            f"--weight-types {','.join(unknown)}: dynamic selection scores "
            f"{', '.join(DYNAMIC_WEIGHT_TYPES)}",
            hint="e.g. --weight-types FFN_1,FFN_2,attention",
        )
    return int(top_n), int(split_num), list(weight_types)


def _dynamic_selection(
    net: nn.Module,
    inp: StageInput,
    opts: TrainOptions,
    records: dict[str, ModuleRecord],
    rows: list[dict[str, Any]],
    collator: Any,
    epochs: int,
) -> DynamicSelection:
    """The dynamic-selection hook. Top-n, split-num and weight types default to those of the
    input's selection; when they match it, its choice is round 0 and its scores are kept."""
    selection = inp.selection or {}
    top_n, split_num, weight_types = _dynamic_plan(inp, opts)
    same = selection.get("chosen") is not None and (top_n, split_num, list(weight_types)) == (
        selection.get("top_n"),
        selection.get("split_num"),
        selection.get("weight_types"),
    )
    carried = _carried_selection(net, inp) if same else None
    data = Path(opts.data).resolve()
    hook = DynamicSelection(
        model_type=net.config.model_type,  # type: ignore[attr-defined]
        weight_types=list(weight_types),
        top_n=int(top_n),
        split_num=int(split_num),
        epochs=epochs,
        rows=rows,
        collator=collator,
        batch_size=opts.batch_size,
        num_cores=opts.num_cores,
        already=[n for n in records if carried is None or n not in carried["chosen"]],
        round0=carried["chosen"] if carried is not None else None,
        info={"seed": opts.seed, "data": {"path": str(data), "sha256": sha256_file(data)}},
    )
    if carried is not None:
        hook.scores.update(carried.get("scores") or {})
        hook.patterns.update(carried.get("patterns") or {})
    return hook


# -- metrics ---------------------------------------------------------------------------------


def _metrics(
    opts: TrainOptions,
    run: TrainingRun,
    state: LoopState,
    net: nn.Module,
    num_processes: int,
    resumed_from: int | None,
) -> dict[str, Any]:
    """The manifest's `metrics`. `final_loss` is the mean training loss of the last
    `loss_history` bucket (the last ceil(steps / 20) steps)."""
    losses = state.losses
    size = max(1, math.ceil(len(losses) / LOSS_HISTORY_POINTS))
    history = [
        {"step": i + len(chunk), "loss": sum(chunk) / len(chunk)}
        for i in range(0, len(losses), size)
        for chunk in [losses[i : i + size]]
    ]
    count = count_parameters(net)
    last_eval = state.evals[-1] if state.evals else {}
    return {
        "mode": opts.mode,
        "steps": state.step,
        "epochs": round(state.step / max(run.steps_per_epoch, 1), 3),
        "final_loss": history[-1]["loss"] if history else None,
        "loss_history": history,
        "eval": state.evals,
        "eval_accuracy": last_eval.get("accuracy"),
        "eval_macro_f1": last_eval.get("macro_f1"),
        "eval_loss": last_eval.get("loss"),
        "trainable_params": count.trainable,
        "total_params": count.total,
        "trainable_fraction": count.fraction,
        "seed": opts.seed,
        "lr": opts.peak_lr,
        "mpo_lr": opts.mpo_lr if opts.mpo_lr is not None else opts.peak_lr,
        "batch_size": opts.batch_size,
        "num_processes": num_processes,
        "train_rows": len(run.train_rows),
        "eval_rows": len(run.eval_rows or []),
        "resumed_from_step": resumed_from,
        "mpo_modules": len(mpo_cores(net)),
    }
