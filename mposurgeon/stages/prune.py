"""prune: zero the smallest weights (unstructured), or remove whole heads / FFN neurons.

The story: resolve the input (a checkpoint, or an artifact whose targeted matrices are plain
dense tensors: merge a factorized or adapted artifact first); find the matrices in the layout of
the `meta` model; plan what goes; stream the tensors into a new artifact. The write is atomic.

Unstructured (`sparsity` P): per targeted matrix (default FFN_1, FFN_2, attention; `layers` /
`target_modules`), the round(P x numel) entries of smallest |w| become exact zeros (ties: the
lower flat index first); with `global_scope`, round(P x total) over all targeted matrices
together. A matrix pruned before keeps its earlier mask too (the union).

Structured: `heads` K removes K attention heads per attention block (for grouped-query attention
K key/value heads with the query heads that share them, the only cut that keeps the grouping),
`ffn_neurons` K removes K intermediate neurons per FFN block, the same K in every block so the
config can express the result. Units are ranked per block by `score`: `magnitude` (sum of |w|
of the unit's weights), or `fisher` (sum of the squared gradients of the unit's weights on
`data`, summed over at most `max_batches` batches). Where the config can express the smaller
width (FFN: every supported architecture but BLOOM, whose MLP is always 4 x hidden; heads:
the Llama family, whose config states `head_dim`) the units are removed physically and the new
config is written: `from_pretrained(out)` builds the smaller model. Elsewhere (BERT-style heads,
BLOOM neurons) the units are masked: exact zeros in their rows / columns / bias entries, with the
mask kept, and the result says `removed: false`.

The mask in the artifact. A pruned tensor `M.<param>` (`weight`, or `bias` of a masked head) has
a companion `M.prune.<param>_mask`: bool, the tensor's stored shape, True where the entry is
pruned (`models.pruning.mask_key`). Every stage passes unknown tensors through or handles
masks: `train` keeps masked entries at zero (the weight tensor a method trains directly: zeroed
before every forward, gradients masked) and writes the masks to its output; `merge` multiplies
every dense tensor it writes by its mask (so a LoRA update W + BA is exactly zero there too) and
leaves the mask tensors out of the plain checkpoint. The manifest records what was pruned in
`pruning`; `inspect` reports each matrix's sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.store import atomic_directory
from mposurgeon.artifact.tensors import ShardedWriter, open_tensors
from mposurgeon.errors import ModelNotFoundError, UsageError
from mposurgeon.methods.config import ModuleRegex, WeightGroups
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.pruning import (
    UnitBlock,
    apply_config,
    attention_blocks,
    can_remove,
    ffn_blocks,
    lowest_units,
    magnitude_masks,
    magnitude_scores,
    mask_key,
    masked_key,
    remove_units,
    slice_scores,
    unit_mask,
)
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    StageInput,
    StageOptions,
    finish_artifact,
    model_layout,
    open_input,
    plan_output,
    tensor_shapes,
    verified_input,
)

DEFAULT_LAYERS = ["FFN_1", "FFN_2", "attention"]


class PruneOptions(StageOptions):
    """Options of `prune` (the CLI flags, one to one; `global_scope` is `--global`)."""

    layers: WeightGroups = Field(None, description="weight groups (--sparsity)")
    target_modules: ModuleRegex = Field(None, description="regex, full match on module names")
    exclude_modules: ModuleRegex = None
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of weights to zero")
    global_scope: bool = Field(False, description="rank all targeted matrices together")
    heads: int | None = Field(None, ge=1, description="attention heads to remove per layer")
    ffn_neurons: int | None = Field(None, ge=1, description="FFN neurons to remove per layer")
    score: Literal["magnitude", "fisher"] = "magnitude"
    data: Path | None = Field(None, description="labelled JSONL/CSV (--score fisher)")
    batch_size: int = Field(8, ge=1)
    max_batches: int = Field(16, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = Field(0, ge=0)
    dry_run: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> PruneOptions:
        structured = self.heads is not None or self.ffn_neurons is not None
        if self.sparsity is None and not structured:
            raise UsageError(
                "nothing to prune: give --sparsity P, --heads K or --ffn-neurons K",
                hint="e.g. mposurgeon prune MODEL --sparsity 0.5",
            )
        if self.sparsity is not None and structured:
            raise UsageError(
                "--sparsity (unstructured) and --heads / --ffn-neurons (structured) are separate "
                "runs",
                hint="prune the units first, then prune the output with --sparsity",
            )
        if self.global_scope and self.sparsity is None:
            raise UsageError("--global applies to --sparsity only")
        if structured and (self.layers or self.target_modules or self.exclude_modules):
            raise UsageError(
                "--layers / --target-modules / --exclude-modules select matrices for --sparsity; "
                "--heads and --ffn-neurons act on every layer (so the config can express it)",
                hint="leave the selection flags out",
            )
        if self.sparsity is not None and self.score != "magnitude":
            raise UsageError(
                "--sparsity prunes by magnitude; --score fisher ranks heads and neurons",
                hint="drop --score, or prune --heads / --ffn-neurons",
            )
        if self.score == "fisher" and self.data is None:
            raise UsageError(
                "--score fisher needs --data (a labelled JSONL or CSV file)",
                hint="or rank units without data: --score magnitude",
            )
        if self.score != "fisher" and self.data is not None:
            raise UsageError("--data is only read by --score fisher", hint="drop --data")
        return self


@dataclass
class PrunedMatrix:
    """One matrix: its size and how many of its entries are zero after pruning (planned in a
    dry run)."""

    name: str
    shape: tuple[int, ...]
    pruned: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


@dataclass
class PrunedUnits:
    """Structured pruning of one kind ("heads" or "ffn"): units per block before, the units
    that go per block, and whether they were removed (or masked)."""

    kind: str
    count: int
    removed: bool
    per_block: dict[str, list[int]] = field(default_factory=dict)
    units_before: int = 0
    unit_heads: int = 1
    config_changes: dict[str, Any] = field(default_factory=dict)
    params_removed: int = 0
    weights_masked: int = 0


@dataclass
class PruneResult:
    output: Path | None
    mode: str  # "unstructured" or "structured"
    matrices: list[PrunedMatrix] = field(default_factory=list)
    units: list[PrunedUnits] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def pruned(self) -> int:
        return sum(m.pruned for m in self.matrices)

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.matrices)


def prune(
    model: str | Path,
    options: PruneOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: Any,
) -> PruneResult:
    """Prune `model` (checkpoint or artifact); write a new artifact.

    `options` or keyword arguments (the same names as the CLI flags) configure the stage, e.g.
    `prune("model", output="sparse", sparsity=0.5)`.
    """
    opts = options or PruneOptions(**kwargs)
    if opts.data is not None and not Path(opts.data).is_file():
        raise ModelNotFoundError(f"no such data file: {opts.data}")
    inp = open_input(model, opts, defer_checksums=True)
    with verified_input(inp):
        shapes = tensor_shapes(inp)
        layout = model_layout(inp.path, shapes)
        if opts.sparsity is not None:
            targets = _targets(inp, layout, shapes, opts)
            with open_tensors(inp.path) as reader:
                masks = _unstructured_masks(reader, targets, shapes, opts)
            result = PruneResult(output=None, mode="unstructured")
            result.matrices = [
                PrunedMatrix(t.name, tuple(shapes[t.weight_key]), int(masks[t.weight_key].sum()))
                for t in targets
            ]
            plan: _Plan = _Plan(masks=masks)
        else:
            result, plan = _structured_plan(inp, layout, shapes, opts, progress)
        total = sum(math.prod(s) for k, s in shapes.items() if masked_key(k) is None)
        result.params_before = total
        result.params_after = total - sum(u.params_removed for u in result.units)
        if opts.dry_run:
            return result

        out = plan_output(inp, opts, "prune")
        with atomic_directory(out, overwrite=opts.overwrite) as tmp:
            with ShardedWriter(tmp, opts.shard_size(inp.path)) as writer:
                _write(inp.path, writer, plan, progress)
            if plan.config is not None:
                plan.config.save_pretrained(tmp)
            finish_artifact(
                tmp,
                inp=inp,
                stage="prune",
                options=opts,
                modules=inp.modules,
                known_checksums=writer.checksums(),
                selection=inp.selection,
                pruning=_record(result),
            )
    result.output = out
    return result


# -- unstructured ------------------------------------------------------------------------------


def _targets(
    inp: StageInput, layout: Any, shapes: dict[str, Any], opts: PruneOptions
) -> list[Target]:
    """The matrices to prune, each a dense tensor of the input's files."""
    layers = opts.layers
    if layers is None and opts.target_modules is None:
        layers = DEFAULT_LAYERS
    keys = set(shapes) | {rec.weight_key for rec in inp.modules.values()}
    targets = select_targets(
        layout,
        keys,
        layers=layers,
        target_modules=opts.target_modules,
        exclude_modules=opts.exclude_modules,
    )
    _refuse_transformed(inp, [t.name for t in targets])
    return targets


def _refuse_transformed(inp: StageInput, names: list[str]) -> None:
    """Refuse matrices a method holds in its own form (MPO cores, a LoRA update)."""
    held = [n for n in names if n in inp.modules]
    if held:
        method = inp.modules[held[0]].method
        raise UsageError(
            f"{held[0]} is held by method {method} in {inp.path} ({len(held)} targeted matrices "
            "are), not as a dense weight: prune prunes dense weights",
            hint=f"merge first (mposurgeon merge {inp.path}), then prune the merged checkpoint",
        )


def _unstructured_masks(
    reader: Any, targets: list[Target], shapes: dict[str, Any], opts: PruneOptions
) -> dict[str, torch.Tensor]:
    """Masks (True: pruned) of every targeted weight, united with a mask it already had."""
    weights = {t.weight_key: reader.get(t.weight_key) for t in targets}
    for key, w in weights.items():
        if not w.is_floating_point():
            raise UsageError(f"{key} holds {w.dtype} weights, which cannot be pruned")
    assert opts.sparsity is not None
    masks = magnitude_masks(weights, opts.sparsity, global_scope=opts.global_scope)
    for key in masks:
        if mask_key(key) in shapes:
            masks[key] = masks[key] | reader.get(mask_key(key)).bool()
    return masks


# -- structured --------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What the write does: masks to apply and keep (stored-tensor key -> bool mask), units to
    remove (key -> [(slice, num_units, drop)]), and the new config (None: unchanged)."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    removals: dict[str, list[tuple[Any, int, list[int]]]] = field(default_factory=dict)
    config: Any | None = None


def _structured_plan(
    inp: StageInput,
    layout: Any,
    shapes: dict[str, Any],
    opts: PruneOptions,
    progress: ProgressCallback | None,
) -> tuple[PruneResult, _Plan]:

    if inp.modules:
        name = next(iter(inp.modules))
        raise UsageError(
            f"{inp.path} holds {len(inp.modules)} matrices in a method's form ({name}, method "
            f"{inp.modules[name].method}): removing heads or neurons needs dense weights",
            hint=f"merge first (mposurgeon merge {inp.path}), then prune the merged checkpoint",
        )
    config = read_config(inp.path)
    kinds: list[tuple[str, int, list[str]]] = []
    if opts.heads is not None:
        kinds.append(("heads", opts.heads, ["attention"]))
    if opts.ffn_neurons is not None:
        kinds.append(("ffn", opts.ffn_neurons, ["FFN_1", "FFN_2"]))
    blocks_of: dict[str, list[UnitBlock]] = {}
    for kind, count, groups in kinds:
        targets = select_targets(layout, set(shapes), layers=groups)
        blocks = attention_blocks(targets, config) if kind == "heads" else ffn_blocks(targets)
        _check_count(kind, count, blocks, config)
        blocks_of[kind] = blocks
    elementwise = None
    if opts.score == "fisher":
        keys = {s.key for bs in blocks_of.values() for b in bs for s in b.slices if s.scored}
        elementwise = _fisher_elementwise(inp, opts, keys, progress)
    result = PruneResult(output=None, mode="structured")
    plan = _Plan()
    new_config = None
    with open_tensors(inp.path) as reader:
        for kind, count, _ in kinds:
            blocks = blocks_of[kind]
            removed = can_remove(config, kind)
            units = PrunedUnits(
                kind=kind,
                count=count,
                removed=removed,
                units_before=blocks[0].num_units,
                unit_heads=blocks[0].unit_heads,
            )
            for block in blocks:
                tensors = {s.key: reader.get(s.key) for s in block.slices}
                if elementwise is None:
                    scores = magnitude_scores(block, tensors)
                else:
                    scores = slice_scores(block, elementwise)
                drop = lowest_units(scores, count)
                units.per_block[block.name] = drop
                for s in block.slices:
                    if removed:
                        plan.removals.setdefault(s.key, []).append((s, block.num_units, drop))
                        units.params_removed += s.size * len(drop) * _across(shapes[s.key], s.axis)
                    else:
                        mask = unit_mask(shapes[s.key], s, drop)
                        if s.key in plan.masks:
                            mask = plan.masks[s.key] | mask
                        plan.masks[s.key] = mask
            if not removed:
                keys = {s.key for b in blocks for s in b.slices}
                units.weights_masked = sum(int(plan.masks[k].sum()) for k in keys)
            else:
                new_config = new_config or config
                units.config_changes = apply_config(new_config, kind, count)
            result.units.append(units)
        for key in plan.masks:  # a tensor masked before keeps its earlier mask too
            if mask_key(key) in shapes:
                plan.masks[key] = plan.masks[key] | reader.get(mask_key(key)).bool()
    plan.config = new_config
    return result, plan


def _across(shape: Any, axis: int) -> int:
    """Elements of one index along `axis` of a tensor of `shape`."""
    return math.prod(shape) // shape[axis]


def _check_count(kind: str, count: int, blocks: list[UnitBlock], config: Any) -> None:
    flag = "--heads" if kind == "heads" else "--ffn-neurons"
    if not blocks:
        raise UsageError(f"{flag}: this {config.model_type} model has no such blocks")
    units = {b.num_units for b in blocks}
    smallest = min(units)
    if count >= smallest:
        what = "attention heads" if kind == "heads" else "FFN neurons"
        if kind == "heads" and blocks[0].unit_heads > 1:
            what = (
                f"key/value heads (grouped-query attention: each removes "
                f"{blocks[0].unit_heads} query heads with it)"
            )
        raise UsageError(
            f"{flag} {count}: the model has {smallest} {what} per layer; at least one must stay",
            hint=f"choose {flag} between 1 and {smallest - 1}",
        )
    if kind == "heads" and len(units) > 1 and can_remove(config, kind):
        raise UsageError(f"{flag}: layers differ in their number of heads ({sorted(units)})")


def _fisher_elementwise(
    inp: StageInput, opts: PruneOptions, keys: set[str], progress: ProgressCallback | None
) -> dict[str, torch.Tensor]:
    """Per weight tensor (file key), the sum over batches of its squared gradients on `data`
    (eval mode, no optimizer step; a seeded shuffle of the rows)."""

    from mposurgeon.models.surgery import resolve_module_name
    from mposurgeon.training.data import Columns, read_dataset
    from mposurgeon.training.model import training_model
    from mposurgeon.training.tasks import generative_task, get_task

    assert opts.data is not None
    generative = generative_task(read_config(inp.path))
    dataset = read_dataset(opts.data, columns=Columns(generative=generative))
    task = get_task(dataset.task)
    task.check_training_data(dataset)
    setup = training_model(
        inp.path, is_artifact=inp.manifest is not None, task=task, data=dataset, seed=opts.seed
    )
    net = setup.model.eval()
    params: dict[str, torch.nn.Parameter] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        params[key] = getattr(net.get_submodule(resolve_module_name(net, module)), param)
    for p in net.parameters():
        p.requires_grad_(True)
    totals = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    features = task.encode(dataset, setup.tokenizer, opts.max_length)
    collate = task.collator(setup.tokenizer, net)
    total = min(opts.max_batches, math.ceil(len(features) / opts.batch_size))
    for i, batch in enumerate(_batches(features, collate, opts.batch_size, opts.seed)):
        if i >= total:
            break
        net.zero_grad(set_to_none=True)
        net(**batch).loss.backward()
        for key, p in params.items():
            if p.grad is not None:
                totals[key] += p.grad.double().square()
        if progress:
            progress("score", i + 1, total)
    return totals


def _batches(features: list[Any], collate: Any, size: int, seed: int) -> Iterator[Any]:
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), size):
        yield collate([features[i] for i in order[start : start + size]])


# -- the write ---------------------------------------------------------------------------------


def _write(
    source: Path, writer: ShardedWriter, plan: _Plan, progress: ProgressCallback | None
) -> None:
    """Stream `source`'s tensors to `writer`: masked tensors zeroed with their mask after them,
    removed units cut out of their tensors (and of the masks those had)."""
    with open_tensors(source) as reader:
        keys = reader.keys()
        for i, key in enumerate(keys):
            base = masked_key(key)
            if base is not None and base in plan.masks:
                continue  # written anew after its tensor
            tensor = reader.get(key)
            cuts = plan.removals.get(base if base is not None else key, [])
            for s, units, drop in cuts:
                tensor = remove_units(tensor, s, units, drop)
            if key in plan.masks:
                mask = plan.masks[key]
                writer.add(key, tensor.masked_fill(mask, 0))
                writer.add(mask_key(key), mask.contiguous())
            else:
                writer.add(key, tensor)
            if progress:
                progress("prune", i + 1, len(keys))


def _record(result: PruneResult) -> dict[str, Any]:
    """The manifest's `pruning` field."""
    record: dict[str, Any] = {"mode": result.mode, "mask_suffix": ".prune.<param>_mask"}
    if result.matrices:
        record["matrices"] = {
            m.name: {"numel": m.numel, "pruned": m.pruned} for m in result.matrices
        }
        record["pruned"] = result.pruned
        record["numel"] = result.numel
    for u in result.units:
        record["heads" if u.kind == "heads" else "ffn_neurons"] = {
            "count": u.count,
            "removed": u.removed,
            "masked": not u.removed,
            "units_before": u.units_before,
            "query_heads_per_unit": u.unit_heads,
            "config_changes": u.config_changes,
            "params_removed": u.params_removed,
            "weights_masked": u.weights_masked,
            "per_block": u.per_block,
        }
    return record
