"""The training loop: AdamW with linear warmup and decay, gradient accumulation and clipping,
evaluation (the run's `Evaluator`: `training.tasks.evaluate` for its task, which `eval` calls
too), periodic checkpoints and exact resume.

Everything goes through `accelerate.Accelerator`: one process on CPU or GPU, or several under
`accelerate launch` / `torchrun` (DDP, gloo on CPU). There is no hand-written distribution
code: the prepared DataLoader shards the rows (`batch_size` is per process), DDP averages the
gradients, `gather_for_metrics` collects eval predictions.

Steps are optimizer steps: `grad_accum` batches each (fewer at the end of an epoch). The
learning rate warms up linearly over `ceil(warmup_ratio * total_steps)` steps, then decays
linearly to 0 at `total_steps` (`max_steps`, or `epochs * steps_per_epoch`).

Determinism and resume. The order of the rows in epoch e depends only on (seed, e)
(`EpochSampler`); dropout draws from the torch RNG, seeded with `seed`. A checkpoint holds the
weights (tied tensors once), the MPO structure, optimizer and scheduler states, every process's
RNG states and the position (epoch, batch in epoch, step), taken at optimizer-step boundaries:
a resumed run takes exactly the steps of the uninterrupted one.

Best weights (`select_best`). After each evaluation whose score beats the best so far, the
trainable parameters are copied to the CPU (what training changes; the rest is as loaded);
at the end they are put back, so the model holds the weights of the best evaluation, and
`state.best_step` says which. Checkpoints carry the copy (`best.safetensors`).

Divergence. A step whose mean loss is NaN or infinite stops the run with `TrainingDiverged`
(a `VerificationError`, exit 3), and so do non-finite weights before a checkpoint is written and
at the end: no checkpoint and no result ever holds NaN weights. A checkpoint that cannot be read
back (a file missing, truncated, or not what `save_checkpoint` wrote) is a `DamagedCheckpoint`
naming the file.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from transformers import get_linear_schedule_with_warmup

from mposurgeon.artifact.tensors import ShardedWriter, open_tensors
from mposurgeon.errors import ArtifactError, UsageError, VerificationError
from mposurgeon.methods.base import Method
from mposurgeon.models.auto import quiet_transformers
from mposurgeon.models.device import Device
from mposurgeon.progress import ProgressCallback
from mposurgeon.training.params import unique_state_dict
from mposurgeon.training.squeeze import Squeezer, frozen_copy
from mposurgeon.training.tasks import model_inputs

CHECKPOINT = "checkpoint"
_CHECKPOINT_TMP = ".checkpoint-tmp"
_CHECKPOINT_OLD = ".checkpoint-old"
_SHARD = 10**12  # checkpoint weights in one file
_WEIGHTS = "model.safetensors"
_BEST = "best.safetensors"  # with --select-best: the trainable weights of the best step
_TEACHER = "teacher.safetensors"  # a squeeze with distillation: the model before the first cut
_DIVERGED_HINT = "lower --lr (and --mpo-lr), or clip gradients harder with --max-grad-norm"


class TrainingDiverged(VerificationError):
    """The training loss or the weights became NaN or infinite."""


class DamagedCheckpoint(ArtifactError):
    """A checkpoint file that is missing or cannot be read back; the message names it."""

    def __init__(self, file: Path, detail: str, hint: str | None = None) -> None:
        super().__init__(f"the checkpoint in {file.parent} is damaged: {file.name} {detail}", hint)
        self.file = file


def damage_detail(exc: BaseException) -> str:
    """What is wrong with a checkpoint file, from the error its reading raised (a few words)."""
    if isinstance(exc, FileNotFoundError):
        return "is missing"
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON ({exc.msg} at line {exc.lineno})"
    if isinstance(exc, KeyError):
        return f"lacks the entry {exc.args[0]!r}" if exc.args else "lacks an entry"
    inner = exc.__context__ if "weights_only" in str(exc) and exc.__context__ else exc
    text = (str(inner).strip().splitlines() or [type(inner).__name__])[0].split(". ")[0]
    return f"cannot be read ({text[:120]})"


@contextmanager
def reading_checkpoint(file: Path) -> Iterator[None]:
    """Turn any failure to read or apply `file` (torch and safetensors raise many kinds:
    UnpicklingError, RuntimeError, EOFError, SafetensorError, ...) into `DamagedCheckpoint`."""
    try:
        yield
    except Exception as exc:
        raise DamagedCheckpoint(file, damage_detail(exc)) from exc


Precision = Literal["fp32", "bf16", "fp16"]
#: --precision -> accelerate's mixed_precision.
MIXED_PRECISION: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

#: The largest seed: `numpy.random.seed` (which accelerate's `set_seed` calls) takes 0..2**32-1.
MAX_SEED = 2**32 - 1


class LoopConfig(BaseModel):
    """The loop's knobs; `TrainOptions` extends them (so the loop takes the options as they
    are). Steps are optimizer steps; every float is finite (an infinite decay would train NaN
    weights). Learning rates come from the method's config."""

    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N steps (overrides epochs)")
    batch_size: int = Field(16, ge=1, description="rows per batch and process")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="NumPy takes seeds below 2**32")
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    precision: Precision | None = Field(
        None, description="bf16, fp16: mixed precision (autocast); None: the launcher's, or fp32"
    )
    device: Device = Field("auto", description="auto: a GPU when there is one")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, more time"
    )


@dataclass(frozen=True)
class BestSelection:
    """`--select-best`: keep the weights of the evaluation with the best `metric` (higher is
    better when `maximize`); a NaN score is never the best, a tie keeps the earlier."""

    metric: str
    maximize: bool

    def better(self, score: float, best: float | None) -> bool:
        if math.isnan(score):
            return False
        if best is None:
            return True
        return score > best if self.maximize else score < best


@dataclass
class LoopState:
    """Where a run is: optimizer steps taken, position in the data, losses, evaluations."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss of each step
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None  # with --select-best: the step of the weights kept
    best_score: float | None = None


class EpochHook(Protocol):
    """Called at the start of every epoch (e.g. dynamic selection); True when it changed the
    model's parameters (the loop then rebuilds optimizer and scheduler). Its state goes into
    checkpoints."""

    def __call__(self, epoch: int, model: nn.Module) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EpochSampler(Sampler[int]):
    """A permutation of range(size) that depends only on (seed, epoch).

    The loop sets `epoch`. (No `set_epoch` method on purpose: accelerate would call it with
    its own count of iterations, which restarts at 0 in a resumed run.)
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


@contextmanager
def launch_accelerator(
    precision: Precision | None = None, device: Device = "auto"
) -> Iterator[Accelerator]:
    """An Accelerator for this launch: `precision` as accelerate's mixed precision (fp32:
    none; bf16, fp16: autocast, the weights and optimizer stay float32; None: what
    `accelerate launch --mixed_precision` set, else fp32), on `device` (auto: a GPU when there
    is one; a multi-process launch without GPUs uses the CPU, gloo). A request the machine
    cannot serve (cuda without a GPU, fp16 without one) is a usage error.

    On the way out it destroys the process group it started, if it started one: gloo's worker
    threads must not outlive the interpreter, or it aborts at exit (SIGABRT, "terminate called
    without an active exception"). A group the caller had set up is left alone. The settings
    are forgotten too, so the next launch in this process may choose others (accelerate keeps
    them process-wide).
    """
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UsageError(
            "--device cuda: torch sees no CUDA device here",
            hint="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine",
        )
    on_cpu = device == "cpu" or not cuda
    if precision == "fp16" and on_cpu:
        raise UsageError(
            "--precision fp16 needs a GPU: float16 autocast does not run on the CPU",
            hint="use --precision bf16 on the CPU",
        )
    started_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=device == "cpu" or (distributed and not cuda),
        mixed_precision=None if precision is None else MIXED_PRECISION[precision],
    )
    try:
        if accelerator.mixed_precision == "fp16" and on_cpu:
            raise UsageError(
                "fp16 mixed precision (from accelerate launch) needs a GPU",
                hint="launch with --mixed_precision bf16 on the CPU",
            )
        yield accelerator
    finally:
        if started_here:
            accelerator.end_training()
            AcceleratorState._reset_state()


def slow_bf16(accelerator: Accelerator) -> bool:
    """Whether `accelerator` runs bf16 autocast on a CPU without native bf16 kernels (no
    AVX512-BF16 or AMX): torch then emulates bf16 matmuls, ~18x slower than fp32 on MiniLM
    (benchmarks/RESULTS.md, `python -m benchmarks precision`)."""
    if accelerator.mixed_precision != "bf16" or accelerator.device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return check is not None and not bool(check())
    except RuntimeError:
        return False


def precision_of(accelerator: Accelerator) -> Precision:
    """The precision `accelerator` trains in: fp32, bf16 or fp16."""
    precision = {v: k for k, v in MIXED_PRECISION.items()}[str(accelerator.mixed_precision)]
    return precision  # type: ignore[return-value]


#: Scores a model on the eval loader: (accelerator, prepared model, prepared loader) ->
#: metrics (`training.tasks.evaluate` bound to the run's task).
Evaluator = Callable[[Accelerator, nn.Module, Any], dict[str, float]]


class TrainingRun:
    """One training run of `model` (a transformers model with a task head, MPO layers or not)
    on encoded rows (dicts with input_ids, attention_mask, labels, ...) batched by `collator`,
    scored by `evaluator` on the eval rows."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        train_rows: Sequence[dict[str, Any]],
        eval_rows: Sequence[dict[str, Any]] | None,
        collator: Callable[[list[dict[str, Any]]], dict[str, Tensor]],
        config: LoopConfig,
        method: Method,
        evaluator: Evaluator,
        *,
        hook: EpochHook | None = None,
        squeezer: Squeezer | None = None,
        progress: ProgressCallback | None = None,
        checkpoint_dir: Path | None = None,
        select_best: BestSelection | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.unwrapped = model
        self.model: nn.Module = model
        self.train_rows = list(train_rows)
        self.eval_rows = list(eval_rows) if eval_rows else None
        self.collator = collator
        self.config = config
        self.method = method
        self.evaluator = evaluator
        self.hook = hook
        self.squeezer = squeezer
        self.progress = progress
        self.checkpoint_dir = checkpoint_dir
        self.select_best = select_best
        self.best_weights: dict[str, Tensor] | None = None  # trainable tensors of best_step
        self.sampler = EpochSampler(len(self.train_rows), config.seed)
        self.state = LoopState()
        self.checkpoint_step: int | None = None  # step of the last checkpoint written or read
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.train_dl: Any = None
        self.eval_dl: Any = None
        self._restored = False
        # Optimizer steps per epoch for one process's share of the rows.
        world = accelerator.num_processes
        batches = math.ceil(math.ceil(len(self.train_rows) / config.batch_size) / world)
        self.steps_per_epoch = math.ceil(batches / config.grad_accum)
        if config.max_steps is not None:
            self.total_steps = config.max_steps
        else:
            self.total_steps = config.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / max(self.steps_per_epoch, 1))

    # -- setup -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """(Re)build optimizer, scheduler and data loaders for the model's current parameters;
        optimizer state of parameters that stay carries over, the schedule continues."""
        acc, cfg = self.accelerator, self.config
        old_optimizer, old_schedule = self.optimizer, None
        if self.scheduler is not None:
            old_schedule = self.scheduler.state_dict()
        if old_optimizer is not None:
            self.model = acc.unwrap_model(self.model)
            acc.free_memory()
        self.method.set_trainable(self.unwrapped)
        groups = self.method.parameter_groups(self.unwrapped, weight_decay=cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups)
        if old_optimizer is not None:
            old_state = old_optimizer.optimizer.state
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p in old_state:
                        optimizer.state[p] = old_state[p]
        train_dl = DataLoader(
            self.train_rows,  # type: ignore[arg-type]
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=self.collator,
            generator=torch.Generator(),  # iterators draw seeds from it, not from the global RNG
        )
        objects: list[Any] = [self.unwrapped, optimizer, train_dl]
        if self.eval_rows:
            objects.append(
                DataLoader(
                    self.eval_rows,  # type: ignore[arg-type]
                    batch_size=cfg.batch_size,
                    shuffle=False,
                    collate_fn=self.collator,
                    generator=torch.Generator(),
                )
            )
        prepared = acc.prepare(*objects)
        self.model, self.optimizer, self.train_dl = prepared[:3]
        self.eval_dl = prepared[3] if self.eval_rows else None
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        if old_schedule is not None:
            self._load_schedule(old_schedule)

    def _load_schedule(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
        for group, lr in zip(
            self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> LoopState:
        """Train until `total_steps`; evaluate at the end. Returns the final state.
        transformers' notes on the way (which loss a class uses, ...) stay off stderr."""
        with quiet_transformers():
            return self._run()

    def _run(self) -> LoopState:
        cfg, state = self.config, self.state
        if not self._restored:
            set_seed(cfg.seed)
        if self.optimizer is None:
            self._prepare()
        self.model.train()
        while state.step < self.total_steps and state.epoch < self.num_epochs:
            if state.batch_in_epoch == 0 and self.hook is not None:
                if self.hook(state.epoch, self.unwrapped):
                    self._prepare()
                self.model.train()
            self._epoch()
        self._check_weights()
        if self.eval_dl is not None and (not state.evals or state.evals[-1]["step"] != state.step):
            self.evaluate()
        if self.best_weights is not None and state.best_step != state.step:
            self.unwrapped.load_state_dict(self.best_weights, strict=False)
        return state

    def _epoch(self) -> None:
        """Train through the rest of the current epoch (or until total_steps)."""
        acc, state, accum = self.accelerator, self.state, self.config.grad_accum
        self.sampler.epoch = state.epoch
        n = len(self.train_dl)
        loader = self.train_dl
        if state.batch_in_epoch:
            loader = acc.skip_first_batches(self.train_dl, state.batch_in_epoch)
        pending: list[Tensor] = []
        for batch in loader:
            i = state.batch_in_epoch
            start = i - i % accum
            size = min(accum, n - start)  # batches in this step
            last = i + 1 == start + size
            with nullcontext() if last else acc.no_sync(self.model):
                loss = self._loss(batch)
                extra = self.method.training_loss(self.unwrapped)
                acc.backward((loss if extra is None else loss + extra) / size)
            pending.append(loss.detach())
            state.batch_in_epoch += 1
            if state.batch_in_epoch == n:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if last:
                self._optimizer_step()
                step_loss = float(acc.reduce(torch.stack(pending).mean(), reduction="mean"))
                pending = []
                if not math.isfinite(step_loss):
                    raise TrainingDiverged(
                        f"training diverged: the loss is {step_loss} at step {state.step}",
                        hint=_DIVERGED_HINT,
                    )
                self._after_step(step_loss)
                if state.step >= self.total_steps:
                    return

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        """The training loss of one batch: the task's, distilled while a squeeze has a
        teacher."""
        inputs = model_inputs(self.unwrapped, batch)
        outputs = self.model(**inputs)
        if self.squeezer is None:
            return outputs.loss
        return self.squeezer.training_loss(outputs.loss, outputs.logits, inputs)

    def _optimizer_step(self) -> None:
        self.method.before_optimizer_step(self.unwrapped, self.state.step, self.config.seed)
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def _after_step(self, loss: float) -> None:
        cfg, state = self.config, self.state
        state.losses.append(loss)
        if self.squeezer is not None:
            if self.squeezer.evaluate is None and self.eval_dl is not None:
                self.squeezer.evaluate = self._score
            if self.squeezer(state.step, self.unwrapped):  # bonds cut: new core parameters
                self._prepare()
                self.model.train()
        if cfg.eval_every and state.step % cfg.eval_every == 0 and self.eval_dl is not None:
            self.evaluate()
        if cfg.save_every and state.step % cfg.save_every == 0 and self.checkpoint_dir:
            self.save_checkpoint()
        if self.progress is not None:
            self.progress(f"train loss {loss:.4f}", state.step, self.total_steps)

    @torch.no_grad()
    def _check_weights(self) -> None:
        """Stop with `TrainingDiverged` if a parameter holds NaN or infinity."""
        for name, param in self.unwrapped.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise TrainingDiverged(
                    f"training diverged: {name} holds NaN or infinite values at step "
                    f"{self.state.step}",
                    hint=_DIVERGED_HINT,
                )

    def _score(self) -> dict[str, float]:
        """The evaluator's metrics now, recorded nowhere (a squeeze cut logs them)."""
        scores = self.evaluator(self.accelerator, self.model, self.eval_dl)
        self.model.train()
        return scores

    def evaluate(self) -> dict[str, Any]:
        """The task's metrics on the eval rows (the run's evaluator); appended to
        `state.evals`."""
        scores = self.evaluator(self.accelerator, self.model, self.eval_dl)
        self.model.train()
        result = {"step": self.state.step, **scores}
        self.state.evals.append(result)
        best, state = self.select_best, self.state
        if best is not None and best.better(float(scores[best.metric]), state.best_score):
            state.best_step, state.best_score = state.step, float(scores[best.metric])
            self.best_weights = self._trainable_weights()
        return result

    def _trainable_weights(self) -> dict[str, Tensor]:
        """A copy (on the CPU) of every trainable parameter: all that training changes."""
        return {
            name: p.detach().to("cpu", copy=True)
            for name, p in self.unwrapped.named_parameters()
            if p.requires_grad
        }

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write `<checkpoint_dir>/checkpoint` (replacing the previous one only once complete)."""
        assert self.checkpoint_dir is not None
        acc = self.accelerator
        self._check_weights()  # never a checkpoint of a diverged run
        final = self.checkpoint_dir / CHECKPOINT
        tmp = self.checkpoint_dir / _CHECKPOINT_TMP
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            tensors, _ = unique_state_dict(self.unwrapped)
            with ShardedWriter(tmp, _SHARD) as writer:
                for key, tensor in tensors.items():
                    writer.add(key, tensor)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                tmp / "optimizer.pt",
            )
            if self.best_weights is not None:
                save_file(self.best_weights, str(tmp / _BEST))
            if self.squeezer is not None and self.squeezer.teacher is not None:
                teacher, _ = unique_state_dict(self.squeezer.teacher)
                save_file({k: v.contiguous() for k, v in teacher.items()}, str(tmp / _TEACHER))
            info = {
                "state": asdict(self.state),
                "num_processes": acc.num_processes,
                "total_steps": self.total_steps,
                "structure": self.method.live_structure(self.unwrapped),
                "hook": self.hook.state_dict() if self.hook is not None else None,
                "squeeze": self.squeezer.state_dict() if self.squeezer is not None else None,
            }
            (tmp / "state.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            old = self.checkpoint_dir / _CHECKPOINT_OLD
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.checkpoint_step = self.state.step
        return final

    def restore(self, directory: Path) -> None:
        """Continue from the checkpoint in `directory` (written by `save_checkpoint`); a file
        that is missing or cannot be read back is a `DamagedCheckpoint` naming it."""
        acc = self.accelerator
        state_file = directory / "state.json"
        with reading_checkpoint(state_file):
            info = json.loads(state_file.read_text(encoding="utf-8"))
            num_processes, total_steps = int(info["num_processes"]), int(info["total_steps"])
            structure, hook_state = info["structure"], info["hook"]
            state = LoopState(**info["state"])
        if num_processes != acc.num_processes:
            raise UsageError(
                f"the checkpoint in {directory} was written by {num_processes} "
                f"processes; this run has {acc.num_processes}",
                hint="resume with the same number of processes",
            )
        if total_steps != self.total_steps:
            raise UsageError(
                f"the checkpoint in {directory} is of a run of {total_steps} steps; "
                f"these options give {self.total_steps}",
                hint="resume with the options of the interrupted run",
            )
        with reading_checkpoint(directory / _WEIGHTS):
            if not (directory / _WEIGHTS).is_file():
                raise FileNotFoundError(directory / _WEIGHTS)
            with open_tensors(directory / _WEIGHTS) as reader:
                tensors = {key: reader.get(key) for key in reader.keys()}
        squeeze = info.get("squeeze")
        squeezer = self.squeezer
        if squeezer and squeezer.distillation and squeeze and squeeze["cuts"]:
            with reading_checkpoint(directory / _TEACHER):  # the model before the first cut
                teacher = frozen_copy(self.unwrapped)
                teacher.load_state_dict(load_file(str(directory / _TEACHER)), strict=False)
                squeezer.teacher = teacher
        with reading_checkpoint(state_file):
            self.method.restore_structure(self.unwrapped, structure, tensors)
        with reading_checkpoint(directory / _WEIGHTS):
            result = self.unwrapped.load_state_dict(tensors, strict=False)
        _, aliases = unique_state_dict(self.unwrapped)
        missing = [k for k in result.missing_keys if k not in aliases]
        if missing or result.unexpected_keys:
            raise UsageError(
                f"the checkpoint in {directory} does not fit the model "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})",
                hint="resume with the input and options of the interrupted run",
            )
        if self.hook is not None and hook_state is not None:
            with reading_checkpoint(state_file):
                self.hook.load_state_dict(hook_state)
        if self.squeezer is not None and squeeze is not None:
            with reading_checkpoint(state_file):
                self.squeezer.load_state_dict(squeeze)
        self._prepare()
        optimizer_file = directory / "optimizer.pt"
        with reading_checkpoint(optimizer_file):
            saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self._load_schedule(saved["scheduler"])
        rng_file = directory / f"rng-{acc.process_index}.pt"
        with reading_checkpoint(rng_file):
            _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        if self.select_best is not None and state.best_step is not None:
            with reading_checkpoint(directory / _BEST):
                self.best_weights = load_file(str(directory / _BEST))
        self.state = state
        self.checkpoint_step = self.state.step
        self._restored = True


def _rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, in types `torch.load(weights_only=True)`
    reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
