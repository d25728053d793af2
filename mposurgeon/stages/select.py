"""select: score weight matrices and record which ones matter (OPF's topN selection).

The story: resolve the input; find the candidate matrices of the requested weight types on a
`meta` model (FFN_1, FFN_2, attention; exact name matching); check that N layers exist in every
weight pattern; score every candidate; choose the N best per pattern (FFN_1, FFN_2 and each
attention projection q, k, v, o separately); then stream the tensors, unchanged, into a new
artifact whose manifest records the `selection`. `decompose` of that artifact (without
`--layers`) decomposes exactly the chosen modules, and `train` follows the selection.

Scores (higher = more important), keyed by module name as the checkpoint files hold it:
- `fisher` (needs data): ChildTuning-D Fisher information of the matrix on a task, with a
  sequence-classification head (seeded, added when the checkpoint has none, never saved):
  `mean(grad^2)` averaged over batches, gradients clipped globally (training/importance.py).
- `magnitude` (data-free): `||W||_F / sqrt(numel)`, the root-mean-square weight.
- `entropy` (data-free): the mean, over the inner bonds of the MPO of W, of the bond
  entanglement entropy `-sum p log p`, `p = lambda^2 / sum lambda^2` (natural log); the
  lambdas are the singular values of W's unfoldings (float64). A dense matrix takes the modes
  `decompose` would give it (`plan_shape` with `num_cores`), an MPO module its stored modes.

Modules that are already MPO (the input is an artifact) are scored like the others, through
their dense reconstruction (fisher: the gradient of the reconstructed weight), and may be
chosen: `train --mode overparam` then trains all their cores; `decompose` leaves them as they
are.

Dynamic selection (`split_num = K`): `top_n / K` matrices per pattern are chosen at each of the
epochs 0, ceil(E/K), 2 ceil(E/K), ... (E = `epochs`, or given to `train` later). Round 0 is
chosen here (`chosen`); `train` re-scores the later rounds on the model being trained.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.manifest import (
    DataRef,
    SelectionRecord,
    SelectionRound,
    SelectionSchedule,
)
from mposurgeon.artifact.store import atomic_directory, sha256_file
from mposurgeon.artifact.tensors import ShardedWriter, TensorReader, open_tensors
from mposurgeon.errors import ModelNotFoundError, UsageError
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import record_cores
from mposurgeon.methods.registry import get_method
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.orientation import as_matrix
from mposurgeon.models.surgery import resolve_module_name
from mposurgeon.mpo.decomposition import bond_spectra
from mposurgeon.mpo.decomposition import decompose as decompose_matrix
from mposurgeon.mpo.metrics import entanglement_entropy
from mposurgeon.mpo.shapes import plan_shape
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    StageInput,
    StageOptions,
    check_mpo_records,
    finish_artifact,
    model_layout,
    open_input,
    plan_output,
    tensor_shapes,
)
from mposurgeon.training.importance import choose_top_n, fisher_scores, weight_pattern

#: The weight types `select` chooses among (OPF's): groups of models/groups.py.
WEIGHT_TYPES: tuple[str, ...] = ("FFN_1", "FFN_2", "attention")

Method = Literal["fisher", "magnitude", "entropy"]


class SelectOptions(StageOptions):
    """Options of `select` (the CLI flags, one to one)."""

    top_n: int = Field(..., ge=0, description="matrices (layers) to choose per weight pattern")
    weight_types: list[str] = Field(default_factory=lambda: list(WEIGHT_TYPES))
    method: Method = "fisher"
    data: Path | None = Field(None, description="labelled JSONL/CSV (fisher only)")
    max_batches: int | None = Field(None, ge=1, description="fisher: batches to score on")
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=2, description="fisher: tokens per example")
    max_grad_norm: float | None = Field(1.0, gt=0, description="fisher: global clip norm")
    split_num: int = Field(1, ge=1, description="rounds of a dynamic selection")
    epochs: int | None = Field(None, ge=1, description="training epochs of a dynamic schedule")
    num_cores: int = Field(5, ge=2, le=64, description="entropy: cores of a dense matrix's MPO")
    seed: int = 0

    @field_validator("weight_types", mode="before")
    @classmethod
    def _canonical_types(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        names = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
        canonical = {t.lower(): t for t in WEIGHT_TYPES}
        for name in names:
            if name.lower() not in canonical:
                # UsageError (not ValueError) passes through pydantic: a one-line exit-2 error.
                raise UsageError(
                    f"unknown weight type {name!r}; weight types are {', '.join(WEIGHT_TYPES)}",
                    hint="e.g. --weight-types FFN_1,attention",
                )
        if not names:
            raise UsageError("no weight types given", hint="e.g. --weight-types FFN_1,attention")
        wanted = {canonical[n.lower()] for n in names}
        return [t for t in WEIGHT_TYPES if t in wanted]

    @model_validator(mode="after")
    def _consistent(self) -> SelectOptions:
        if self.method == "fisher" and self.data is None:
            raise UsageError(
                "--method fisher needs --data (a labelled JSONL or CSV file)",
                hint="or use a data-free method: --method magnitude or --method entropy",
            )
        if self.method != "fisher" and self.data is not None:
            raise UsageError(
                f"--data is only read by --method fisher, not {self.method}",
                hint="drop --data, or use --method fisher",
            )
        if self.top_n % self.split_num:
            raise UsageError(
                f"--top-n {self.top_n} is not divisible by --split-num {self.split_num}",
                hint="each of the split_num rounds chooses top_n / split_num matrices",
            )
        if self.epochs is not None and self.split_num > 1:
            last = (self.split_num - 1) * _interval(self.epochs, self.split_num)
            if last >= self.epochs:
                raise UsageError(
                    f"--split-num {self.split_num} rounds do not fit in {self.epochs} epochs "
                    f"(the last round would start at epoch {last})",
                    hint="use fewer rounds or more epochs",
                )
        return self


@dataclass
class SelectResult:
    """What `select` chose, and where it wrote the artifact."""

    output: Path
    selection: SelectionRecord
    candidates: int
    batches: int | None = None
    examples: int | None = None
    seconds: float = 0.0

    @property
    def chosen(self) -> list[str]:
        return list(self.selection.chosen)

    @property
    def scores(self) -> dict[str, float]:
        return dict(self.selection.scores)


def select(
    model: str | Path,
    options: SelectOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> SelectResult:
    """Score the candidate matrices of `model`, choose the top N per weight pattern, and write
    a new artifact recording the selection (the tensors pass through unchanged)."""
    opts = options or SelectOptions(**kwargs)  # type: ignore[arg-type]
    inp = open_input(model, opts)
    targets, patterns = _candidates(inp, opts)
    _check_top_n(opts.top_n, patterns)
    if opts.data is not None and not Path(opts.data).is_file():
        raise ModelNotFoundError(f"no such data file: {opts.data}")
    out = plan_output(inp, opts, "select")

    started = time.perf_counter()
    batches = examples = None
    if opts.method == "fisher":
        scores, batches, examples = _fisher(inp, opts, targets, progress)
    else:
        scores = _data_free(inp, opts, targets, progress)
    seconds = time.perf_counter() - started

    per_round = opts.top_n // opts.split_num
    chosen = choose_top_n(scores, patterns, per_round)
    selection = _selection_record(opts, scores, patterns, chosen)

    with atomic_directory(out, overwrite=opts.overwrite) as tmp, open_tensors(inp.path) as reader:
        with ShardedWriter(tmp, opts.shard_size(inp.path)) as writer:
            keys = reader.keys()
            for i, key in enumerate(keys):
                writer.add(key, reader.get(key))
                if progress:
                    progress("write", i + 1, len(keys))
        finish_artifact(
            tmp,
            inp=inp,
            stage="select",
            options=opts,
            modules=inp.mpo_modules,
            known_checksums=writer.checksums(),
            selection=selection,
        )
    return SelectResult(
        output=out,
        selection=selection,
        candidates=len(targets),
        batches=batches,
        examples=examples,
        seconds=seconds,
    )


def _candidates(inp: StageInput, opts: SelectOptions) -> tuple[list[Target], dict[str, str]]:
    """The matrices of the requested weight types, and each one's weight pattern."""
    shapes = tensor_shapes(inp)
    layout = model_layout(inp.path, shapes)
    check_mpo_records(layout, inp.mpo_modules, shapes)
    file_keys = set(shapes) | {rec.weight_key for rec in inp.mpo_modules.values()}
    targets = select_targets(layout, file_keys, layers=opts.weight_types)
    patterns = {}
    kept = []
    for target in targets:
        pattern = weight_pattern(layout.model_type or "", target.group, target.name)
        if pattern is not None:
            patterns[target.name] = pattern
            kept.append(target)
    return kept, patterns


def _check_top_n(top_n: int, patterns: dict[str, str]) -> None:
    """top_n may not exceed the number of matrices (layers) of any weight pattern."""
    counts = Counter(patterns.values())
    pattern, fewest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if top_n > fewest:
        listed = ", ".join(f"{p}: {n}" for p, n in sorted(counts.items()))
        raise UsageError(
            f"--top-n {top_n} exceeds the {fewest} layers of weight pattern {pattern} "
            f"(matrices per pattern: {listed})",
            hint=f"choose --top-n between 0 and {fewest}",
        )


def _interval(epochs: int, split_num: int) -> int:
    """Epochs between two rounds of a dynamic selection: ceil(E / K)."""
    return math.ceil(epochs / split_num)


def _selection_record(
    opts: SelectOptions,
    scores: dict[str, float],
    patterns: dict[str, str],
    chosen: list[str],
) -> SelectionRecord:
    """The manifest's `selection` (see DESIGN.md and the module docstring); every field is
    written, `data` and `schedule` as null when there are none."""
    data = None
    if opts.data is not None:
        path = Path(opts.data).resolve()
        data = DataRef(path=str(path), sha256=sha256_file(path))
    schedule = None
    if opts.split_num > 1:
        step = _interval(opts.epochs, opts.split_num) if opts.epochs else None
        schedule = SelectionSchedule(
            split_num=opts.split_num,
            per_round=opts.top_n // opts.split_num,
            epochs=opts.epochs,
            interval=step,
            rounds=[
                SelectionRound(
                    round=k,
                    epoch=k * step if step is not None else None,
                    chosen=chosen if k == 0 else None,
                )
                for k in range(opts.split_num)
            ],
        )
    return SelectionRecord(
        method=opts.method,
        weight_types=list(opts.weight_types),
        top_n=opts.top_n,
        split_num=opts.split_num,
        seed=opts.seed,
        data=data,
        scores=scores,
        patterns=patterns,
        chosen=chosen,
        schedule=schedule,
    )


# --- scoring ----------------------------------------------------------------------------------


def _data_free(
    inp: StageInput,
    opts: SelectOptions,
    targets: list[Target],
    progress: ProgressCallback | None,
) -> dict[str, float]:
    """magnitude or entropy of every target, read from the files one matrix at a time."""
    records = inp.mpo_modules
    scores: dict[str, float] = {}
    with open_tensors(inp.path) as reader:
        for i, target in enumerate(targets):
            record = records.get(target.name)
            if opts.method == "entropy":
                scores[target.name] = _entropy_score(target, reader, record, opts.num_cores)
            else:
                if record is not None:
                    matrix = get_method(record.method).to_dense(record, reader)
                else:
                    matrix = reader.get(target.weight_key)
                scores[target.name] = magnitude_score(matrix)
            if progress:
                progress("score", i + 1, len(targets))
    return scores


def magnitude_score(matrix: torch.Tensor) -> float:
    """||W||_F / sqrt(numel): the root-mean-square entry (orientation does not matter)."""
    w = matrix.double()
    return float(torch.linalg.vector_norm(w)) / math.sqrt(w.numel())


def entropy_score(spectra: list[torch.Tensor]) -> float:
    """Mean bond entanglement entropy (nats) over the inner bonds' singular values."""
    return sum(entanglement_entropy(s) for s in spectra) / len(spectra)


def _entropy_score(
    target: Target, reader: TensorReader, record: MPORecord | None, num_cores: int
) -> float:
    """entropy_score of a stored MPO's exact bond spectra, or of a dense matrix's MPO."""
    if record is not None:
        return entropy_score(bond_spectra(record_cores(record, reader)))
    matrix = as_matrix(reader.get(target.weight_key), target.kind)
    shape = plan_shape(target.out_dim, target.in_dim, num_cores)
    return entropy_score(decompose_matrix(matrix.double(), shape).spectra)


def _fisher(
    inp: StageInput,
    opts: SelectOptions,
    targets: list[Target],
    progress: ProgressCallback | None,
) -> tuple[dict[str, float], int, int]:
    """Fisher scores on the data (a seeded shuffle; at most max_batches batches)."""

    from mposurgeon.training.data import Columns, read_dataset
    from mposurgeon.training.model import training_model
    from mposurgeon.training.tasks import generative_task, get_task

    assert opts.data is not None
    generative = generative_task(read_config(inp.path))
    dataset = read_dataset(opts.data, columns=Columns(generative=generative))
    task = get_task(dataset.task)
    task.check_training_data(dataset)
    setup = training_model(
        inp.path,
        is_artifact=inp.manifest is not None,
        task=task,
        data=dataset,
        seed=opts.seed,
        verify=opts.verify_checksums,
    )
    features = task.encode(dataset, setup.tokenizer, opts.max_length)
    total = math.ceil(len(features) / opts.batch_size)
    if opts.max_batches is not None:
        total = min(total, opts.max_batches)
    live = {target.name: resolve_module_name(setup.model, target.name) for target in targets}
    batches = _shuffled_batches(
        features, task.collator(setup.tokenizer, setup.model), opts.batch_size, opts.seed
    )
    scores = fisher_scores(
        setup.model,
        _counted(batches, total, progress),
        list(live.values()),
        max_batches=total,
        max_grad_norm=opts.max_grad_norm,
    )
    examples = min(len(features), total * opts.batch_size)
    return {name: scores[live_name] for name, live_name in live.items()}, total, examples


def _shuffled_batches(
    features: list[dict[str, Any]], collate: Any, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `features` in an order fixed by `seed`."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), batch_size):
        yield collate([features[i] for i in order[start : start + batch_size]])


def _counted(
    batches: Iterator[dict[str, torch.Tensor]], total: int, progress: ProgressCallback | None
) -> Iterator[dict[str, torch.Tensor]]:
    """`batches`, reporting progress("score", i, total) as each one is consumed."""
    for i, batch in enumerate(batches):
        if i >= total:
            return
        yield batch
        if progress:
            progress("score", i + 1, total)
