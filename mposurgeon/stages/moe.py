"""moe: upcycle the feed-forward layers of a checkpoint into MPO mixtures of experts (MPOE).

The story: resolve the input; find the targeted FFN matrices (FFN_1 and FFN_2 by default) and
group them by block (one transformer layer's FFN); validate everything (each block needs its
up and down projections, gates fit the architecture) before any work; draw each block's router
from `seed`; then stream the checkpoint into a new artifact, replacing each targeted weight by
its lossless MPO (or the input's MPO cores, when it is already decomposed) made into E experts
that share the central core (`models/moe.py`, `methods/mpoe/`). The write is atomic. At
upcycling every expert equals the dense matrix, so the model computes what the dense one did.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.store import atomic_directory
from mposurgeon.artifact.tensors import ShardedWriter, TensorReader, open_tensors
from mposurgeon.errors import UsageError
from mposurgeon.methods.config import ModuleRegex, WeightGroups
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import factorize_weight, mpo_record, record_cores
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.methods.mpoe.state import expert_tensors, router_weight
from mposurgeon.models.groups import Target, select_targets
from mposurgeon.models.pruning import canonical_type, layer_key
from mposurgeon.mpo.shapes import MPOShape, plan_shape
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

DEFAULT_LAYERS = ["FFN_1", "FFN_2"]
#: Model types whose FFN is upcycled with Switch Transformers' gate by default.
SWITCH_TYPES = {"t5"}


class MoeOptions(StageOptions):
    """Options of `moe` (the CLI flags, one to one)."""

    experts: int = Field(4, ge=2, le=1024, description="experts per FFN matrix")
    top_k: int = Field(1, ge=1, description="experts each token goes through")
    capacity_factor: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="training: slots per expert (0: no limit)"
    )
    router_jitter: float = Field(0.0, ge=0, lt=1, description="training: router input noise")
    gate: Literal["auto", "normalized", "switch"] = "auto"
    layers: WeightGroups = Field(None, description="weight groups (FFN_1,FFN_2)")
    target_modules: ModuleRegex = Field(None, description="regex, full match on module names")
    exclude_modules: ModuleRegex = None
    num_cores: int = Field(5, ge=2, le=64)
    seed: int = Field(0, ge=0)
    dry_run: bool = False


@dataclass
class MoeBlock:
    """One FFN block: its router's name (file namespace) and its matrices, `in` first."""

    router: str
    targets: list[Target]
    roles: list[Literal["in", "out"]]

    @property
    def d_model(self) -> int:
        return self.targets[0].in_dim


@dataclass
class MoeResult:
    """What `moe` did (or would do): parameter counts of the targeted matrices (`dense`),
    of their MPOE form (`shared`: the central cores, once; `per_expert`: one expert's
    auxiliary cores; `routers`), and of Switch-style upcycling with dense experts."""

    output: Path | None
    experts: int
    top_k: int
    gate: str
    blocks: list[MoeBlock] = field(default_factory=list)
    dense: int = 0
    shared: int = 0
    per_expert: int = 0
    routers: int = 0

    @property
    def mpoe(self) -> int:
        """Parameters of the MPOE layers: shared + E x per_expert + routers."""
        return self.shared + self.experts * self.per_expert + self.routers

    @property
    def dense_experts(self) -> int:
        """Parameters of the same layers as E dense experts plus routers (Switch upcycling)."""
        return self.experts * self.dense + self.routers


def moe(
    model: str | Path,
    options: MoeOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> MoeResult:
    """Upcycle the FFN matrices of `model` into MPO mixtures of experts; write a new artifact.

    `options` or keyword arguments (the same names as the CLI flags) configure the stage.
    """
    opts = options or MoeOptions(**kwargs)
    inp = open_input(model, opts, defer_checksums=True)
    with verified_input(inp):
        config = read_config(inp.path)
        gate = _gate(opts, canonical_type(config.model_type))
        blocks = _blocks(inp, opts)
        shapes = {t.name: _shape(inp, t, opts.num_cores) for b in blocks for t in b.targets}
        bonds = {n: tuple(r.bonds) for n, r in inp.mpo_modules.items()}
        result = _counts(blocks, shapes, bonds, opts, gate)
        if opts.dry_run:
            return result
        generator = torch.Generator().manual_seed(opts.seed)
        out = plan_output(inp, opts, "moe")
        with atomic_directory(out, overwrite=opts.overwrite) as tmp:
            with ShardedWriter(tmp, opts.shard_size(inp.path)) as writer:
                records = _write(inp, writer, blocks, shapes, opts, gate, generator, progress)
            kept = {n: r for n, r in inp.modules.items() if n not in records}
            finish_artifact(
                tmp,
                inp=inp,
                stage="moe",
                options=opts,
                modules={**kept, **records},
                known_checksums=writer.checksums(),
                selection=inp.selection,
            )
        result.output = out
        return result


def _gate(opts: MoeOptions, model_type: str) -> Literal["normalized", "switch"]:
    """The gate for this model: `--gate`, else Switch's for T5 and Mixtral's otherwise."""
    gate = opts.gate
    if gate == "auto":
        gate = "switch" if model_type in SWITCH_TYPES else "normalized"
    if gate == "switch" and opts.top_k != 1:
        raise UsageError(
            f"--top-k {opts.top_k}: switch gates (Switch Transformers', the default for T5) "
            "route each token to one expert",
            hint="use --top-k 1, or --gate normalized (Mixtral's) for top-k routing",
        )
    if opts.top_k > opts.experts:
        raise UsageError(
            f"--top-k {opts.top_k} is more than the {opts.experts} experts",
            hint=f"choose --top-k between 1 and {opts.experts}",
        )
    return gate


def _blocks(inp: StageInput, opts: MoeOptions) -> list[MoeBlock]:
    """The targeted matrices grouped by FFN block, each block with an up and a down
    projection (FFN_1: `in`, FFN_2: `out`), validated."""
    shapes = tensor_shapes(inp)
    layout = model_layout(inp.path, shapes)
    file_keys = set(shapes) | {rec.weight_key for rec in inp.modules.values()}
    chosen = opts.layers is not None or opts.target_modules is not None
    targets = select_targets(
        layout,
        file_keys,
        layers=opts.layers if chosen else DEFAULT_LAYERS,
        target_modules=opts.target_modules,
        exclude_modules=opts.exclude_modules,
    )
    ffn = {t.name: t.group for t in select_targets(layout, file_keys, layers=DEFAULT_LAYERS)}
    targets = [replace(t, group=ffn.get(t.name, t.group)) for t in targets]  # regex: no group
    other = [t for t in targets if t.group not in ("FFN_1", "FFN_2") or t.kind == "embedding"]
    if other:
        raise UsageError(
            f"{other[0].name} is not a feed-forward matrix: moe upcycles FFN_1 and FFN_2 only",
            hint="target feed-forward matrices (--layers FFN_1,FFN_2)",
        )
    owned = {n: r for n, r in inp.modules.items() if not isinstance(r, MPORecord)}
    taken = [t for t in targets if t.name in owned]
    if taken:
        rec = owned[taken[0].name]
        raise UsageError(
            f"{taken[0].name} is held by the {rec.method} method in {inp.path}",
            hint="moe takes dense or MPO matrices: upcycle a merged checkpoint, or the base one",
        )
    by_layer: dict[str, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(layer_key(t.name), []).append(t)
    blocks = []
    for layer, members in by_layer.items():
        members.sort(key=lambda t: (t.group != "FFN_1", t.name))
        roles: list[Literal["in", "out"]] = ["in" if t.group == "FFN_1" else "out" for t in members]
        if "in" not in roles or "out" not in roles:
            missing = "FFN_2 (down)" if "out" not in roles else "FFN_1 (up)"
            raise UsageError(
                f"{layer}: its {missing} projection is not targeted; a token must go through "
                "one expert's whole feed-forward block",
                hint="target both FFN_1 and FFN_2 of every block (the default --layers)",
            )
        prefix = _common_prefix([t.name for t in members])
        blocks.append(MoeBlock(f"{prefix}.mpoe_router", members, roles))
    return blocks


def _common_prefix(names: list[str]) -> str:
    """The longest common dotted prefix of module names (never a whole name)."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _shape(inp: StageInput, target: Target, num_cores: int) -> MPOShape:
    """The MPO shape of a target: its existing cores', else planned with `num_cores`."""
    rec = inp.mpo_modules.get(target.name)
    return (
        rec.mpo_shape if rec is not None else plan_shape(target.out_dim, target.in_dim, num_cores)
    )


def _counts(
    blocks: list[MoeBlock],
    shapes: dict[str, MPOShape],
    bonds_of_input: dict[str, tuple[int, ...]],
    opts: MoeOptions,
    gate: str,
) -> MoeResult:
    """Parameter counts: an MPO input's cores with their bonds, the others with the
    lossless bonds of their planned shapes."""
    result = MoeResult(output=None, experts=opts.experts, top_k=opts.top_k, gate=gate)
    result.blocks = blocks
    for block in blocks:
        result.routers += opts.experts * block.d_model
        for t in block.targets:
            shape = shapes[t.name]
            bonds = bonds_of_input.get(t.name) or shape.full_bonds()
            sizes = [
                bonds[k] * i * j * bonds[k + 1]
                for k, (i, j) in enumerate(zip(shape.out_modes, shape.in_modes, strict=True))
            ]
            central = sizes[shape.central_index]
            result.dense += t.out_dim * t.in_dim
            result.shared += central
            result.per_expert += sum(sizes) - central
    return result


def _write(
    inp: StageInput,
    writer: ShardedWriter,
    blocks: list[MoeBlock],
    shapes: dict[str, MPOShape],
    opts: MoeOptions,
    gate: Literal["normalized", "switch"],
    generator: torch.Generator,
    progress: ProgressCallback | None,
) -> dict[str, MPOERecord]:
    """Stream the input into `writer`, each target's experts where its weight (or, for an
    MPO input, its first core) was; the targets' records."""
    mpo_inputs = inp.mpo_modules
    first: dict[str, tuple[MoeBlock, int]] = {}  # the key a target is written at
    replaced: set[str] = set()  # the keys of the targets' dense weights or input cores
    for block in blocks:
        for i, t in enumerate(block.targets):
            rec = mpo_inputs.get(t.name)
            keys = list(rec.tensor_shapes()) if rec is not None else [t.weight_key]  # + derived
            first[keys[0]] = (block, i)
            replaced.update(keys)
    scale = float(opts.experts) if gate == "switch" else 1.0
    scaled_biases = {
        t.bias_key for b in blocks for t, r in zip(b.targets, b.roles, strict=True)
        if r == "out" and t.bias_key and scale != 1.0
    }  # fmt: skip
    records: dict[str, MPOERecord] = {}
    with open_tensors(inp.path) as reader:
        keys = reader.keys()
        dtype = next((reader.dtype(k) for k in keys if k in first), torch.float32)
        routers = {  # drawn in block order, whatever the files' order
            block.router: router_weight(
                opts.experts, block.d_model, gate=gate, generator=generator, dtype=dtype
            )
            for block in blocks
        }
        for n, key in enumerate(keys):
            if key in first:
                block, i = first[key]
                rec, cores = _factorized(inp, reader, block.targets[i], shapes)
                rec = _record(rec, block, i, opts, gate)
                tensors = expert_tensors(rec, cores, scale if rec.role == "out" else 1.0)
                if rec.owns_router:
                    tensors[f"{block.router}.weight"] = routers[block.router]
                for name, tensor in tensors.items():
                    writer.add(name, tensor)
                records[rec.name] = rec
            elif key not in replaced:
                tensor = reader.get(key)
                writer.add(key, tensor * scale if key in scaled_biases else tensor)
            if progress:
                progress("moe", n + 1, len(keys))
    return records


def _factorized(
    inp: StageInput, reader: TensorReader, target: Target, shapes: dict[str, MPOShape]
) -> tuple[MPORecord, list[torch.Tensor]]:
    """A target's MPO: the input's cores, or its weight decomposed losslessly."""
    rec = inp.mpo_modules.get(target.name)
    if rec is not None:
        return rec, record_cores(rec, reader)
    weight = reader.get(target.weight_key)
    factorized = factorize_weight(weight, target.kind, shapes[target.name])
    rec = mpo_record(
        name=target.name,
        kind=target.kind,
        weight_shape=target.shape,
        dtype=weight.dtype,
        shape=shapes[target.name],
        factorized=factorized,
        tied_keys=target.tied_keys,
    )
    return rec, factorized.cores


def _record(
    base: MPORecord,
    block: MoeBlock,
    index: int,
    opts: MoeOptions,
    gate: Literal["normalized", "switch"],
) -> MPOERecord:
    """The MPOE record of a block's `index`-th matrix from its MPO record."""
    target, role = block.targets[index], block.roles[index]
    sizes = [
        base.bonds[k] * i * j * base.bonds[k + 1]
        for k, (i, j) in enumerate(zip(base.out_modes, base.in_modes, strict=True))
    ]
    central = sizes[base.central_index]
    owns = index == 0
    params = central + opts.experts * (sum(sizes) - central)
    if owns:
        params += opts.experts * block.d_model
    derived = {"fixup", "spectra"}  # they held for the input's cores
    fields = base.model_dump(exclude={"method", "params", "trainable", *derived})  # an MPO's
    return MPOERecord(
        **fields,
        params=params,
        experts=opts.experts,
        role=role,
        top_k=opts.top_k,
        gate=gate,
        capacity_factor=opts.capacity_factor,
        router_jitter=opts.router_jitter,
        router_depth=len(target.name.split(".")) - len(block.router.split(".")) + 1,
        router_in=block.d_model,
        owns_router=owns,
    )
