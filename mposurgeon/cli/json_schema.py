"""The one layout of every `--json` object (schema version 1), as pydantic models.

Every command prints one object on stdout with `--json`, success or failure. Each starts with

- `schema_version` (1): bumped when a key changes meaning or goes away (new keys may come);
- `command`: the command's name (`decompose`, ..., `export-peft`, `run`; null in a failure
  whose command line names no known command);
- `ok`: true; false with `error` (`ErrorJson`: message, hint, exit_code, type) on failure.
  A failed command prints `FailureJson` (those four keys only), except `run`, whose object
  always has its stages and carries the error beside them.

Then the command's own keys (its model below: `DecomposeJson`, ...). Common conventions:

- `input`: the model the command read: its local directory or file as an absolute, resolved
  path (`Path.resolve()`; a hub id's cached snapshot), or the argument as given when it is not
  found locally (a PEFT adapter's base named by hub id). Every other path (`output`, `plot`,
  a run's `recipe`, `workdir`, stage outputs, `sweep.csv`...) is absolute and resolved, or
  null (`output` of a dry run).
- `params` (`Params`): the same keys in every command; null in `eval`, `export-peft`, `run`,
  which describe no model of their own. Numbers a command adds (a truncation's MPO counts
  before and after, a mixture of experts' counts) sit in command-specific keys beside it.
- `bonds` (and `bonds_before`): the inner bond dimensions of an MPO, as the tables show them,
  without the boundary 1s: cores - 1 numbers (`modes[0]` has one entry per core).
- Non-finite floats are null.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mposurgeon.cli.entry import SCHEMA_VERSION
from mposurgeon.cli.render import print_json
from mposurgeon.errors import MposurgeonError

if TYPE_CHECKING:
    from mposurgeon.cli.options import StageFlags


def resolved_path(value: object) -> str | None:
    """`value` (a path) as an absolute, resolved path string; None stays None."""
    if value is None:
        return None
    return str(Path(str(value)).expanduser().resolve())


def _model_ref(value: object) -> object:
    """A MODEL argument: resolved when it names something on disk, else as given (a hub id)."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


#: An absolute, resolved path (a relative or unresolved one is resolved on validation).
AbsPath = Annotated[str, BeforeValidator(resolved_path)]
OptAbsPath = Annotated[str | None, BeforeValidator(resolved_path)]
#: A model: its absolute, resolved local path, or a hub id as given when not on disk.
ModelRef = Annotated[str, BeforeValidator(_model_ref)]
OptModelRef = Annotated[str | None, BeforeValidator(_model_ref)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Params(_Strict):
    """Parameter counts (elements of the weight files' tensors, pruning masks left out), the
    same keys in every command; null where a key does not apply or the command cannot tell."""

    total: int | None = Field(
        None,
        description="all parameters of the model the command wrote (a dry run: would write, "
        "where it can tell) or, in inspect, describes; MPO modules count their cores",
    )
    before: int | None = Field(
        None,
        description="`total` of the input, in commands that write a model from one "
        "(decompose, truncate, select, train, merge, moe, prune); null when the input is no "
        "local model (a PEFT adapter) and in inspect",
    )
    mpo: int | None = Field(None, description="of `total`, the parameters in MPO (MPOE) cores")
    dense: int | None = Field(None, description="`total` - `mpo`")
    dense_equivalent: int | None = Field(
        None,
        description="the dense elements of the matrices an artifact's module records "
        "transform (MPO cores, a LoRA update...; inspect's `dense_equivalent_of_mpo`); 0 "
        "without records, null for a plain checkpoint",
    )
    mpo_ratio: float | None = Field(
        None, description="`mpo` / `dense_equivalent`; null when `dense_equivalent` is 0 or null"
    )
    trainable: int | None = Field(
        None,
        description="parameters that train (a train run, or inspect of its artifact), the "
        "task head included",
    )
    trainable_head: int | None = Field(None, description="of `trainable`, the task head's")


def params_from_counts(counts: dict[str, Any] | None, **known: Any) -> Params:
    """`Params` from `count_params` / inspect's `params` (None: nothing counted), with the
    keys in `known` (e.g. `before`) set over them."""
    c = counts or {}
    return Params(
        total=c.get("total"),
        mpo=c.get("mpo"),
        dense=c.get("dense"),
        dense_equivalent=c.get("dense_equivalent_of_mpo"),
        mpo_ratio=c.get("mpo_ratio"),
        trainable=c.get("trainable"),
        trainable_head=c.get("trainable_head"),
    ).model_copy(update=known)


def local_model(spec: str | Path, flags: StageFlags | None = None) -> Path | None:
    """The local directory or file of a MODEL argument (a hub id: its cached snapshot, never
    fetched), resolved; None when it is not found here (a PEFT adapter's base on the Hub)."""
    from mposurgeon.artifact.resolve import resolve_model

    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    try:
        found = resolve_model(
            str(spec),
            revision=flags.revision if flags else None,
            offline=True,
            cache_dir=flags.cache_dir if flags else None,
            allow_file=True,
        )
    except (MposurgeonError, OSError):
        return None
    return found.path.resolve()


def model_counts(path: str | Path | None) -> dict[str, Any] | None:
    """inspect's parameter counts of a local model (headers only), None when `path` is None
    or no model (a PEFT adapter directory)."""
    from mposurgeon.stages.inspect import count_params

    if path is None:
        return None
    try:
        return count_params(path, offline=True)
    except (MposurgeonError, OSError):
        return None


def input_of(model: str | Path, flags: StageFlags | None) -> str:
    """A command's MODEL argument as its `input`: `local_model`'s path, else as given."""
    path = local_model(model, flags)
    return str(path) if path is not None else str(model)


def source_of(model: str | Path, flags: StageFlags | None) -> tuple[str, dict[str, Any] | None]:
    """A command's MODEL argument as its `input` (`input_of`) and its parameter counts
    (`model_counts`; None when it is no local model)."""
    path = local_model(model, flags)
    return (str(path) if path is not None else str(model)), model_counts(path)


def total_of(counts: dict[str, Any] | None) -> int | None:
    """The `total` of `model_counts`' result (None: not counted)."""
    return None if counts is None else counts["total"]


def planned_params(
    counts: dict[str, Any] | None, d_total: int, d_mpo: int, d_dense_eq: int
) -> Params:
    """A dry run's `Params`: the input's `counts` changed by the planned differences of the
    total, the MPO parameters and their dense equivalent (all null when not counted)."""
    if counts is None:
        return Params()
    total, mpo = counts["total"] + d_total, counts["mpo"] + d_mpo
    dense_eq = counts.get("dense_equivalent_of_mpo", 0) + d_dense_eq
    return Params(
        total=total,
        before=counts["total"],
        mpo=mpo,
        dense=total - mpo,
        dense_equivalent=dense_eq,
        mpo_ratio=mpo / dense_eq if dense_eq else None,
    )


# --- pieces -----------------------------------------------------------------------------------


class ErrorJson(_Strict):
    """Why a command failed: the one-line message and hint of stderr, the exit code and the
    error's class name."""

    message: str
    hint: str | None
    exit_code: int
    type: str


class _BondRow(_Strict):
    """A row with MPO modes and bonds: `bonds` (and `bonds_before`) hold the inner bonds."""

    @model_validator(mode="after")
    def _inner_bonds_only(self) -> _BondRow:
        modes = getattr(self, "modes", None)
        for key in ("bonds", "bonds_before"):
            bonds = getattr(self, key, None)
            if bonds is not None and modes is not None and len(bonds) != len(modes[0]) - 1:
                raise ValueError(
                    f"{key} {bonds} of {len(modes[0])} cores: not the cores - 1 inner bonds"
                )
        return self


class DecomposeModuleJson(_BondRow):
    """One matrix of a decomposition (planned in a dry run: `rel_error` null)."""

    name: str
    group: str | None
    layer: str
    shape: list[int] = Field(description="[out, in]")
    modes: list[list[int]] = Field(description="[out modes, in modes], one of each per core")
    padding: list[int] = Field(description="[out, in] rows and columns padded to the modes")
    bonds: list[int]
    params: int = Field(description="elements of the cores")
    overparam_factor: float = Field(description="`params` / the dense matrix's elements")
    rel_error: float | None = Field(description="measured relative Frobenius error")
    predicted_error: float | None
    entropy: list[float] | None = Field(description="bond entropy (nats) per inner bond")


class DecomposedJson(_Strict):
    """The matrices decomposed by this run (not those the input already held as MPO)."""

    mpo: int = Field(description="their MPO parameters")
    dense_equivalent: int = Field(description="their dense elements")


class TruncateModuleJson(_BondRow):
    """One MPO module of a truncation: bonds and parameters before and after."""

    name: str
    shape: list[int]
    modes: list[list[int]]
    rule: str
    changed: bool
    bonds_before: list[int]
    bonds: list[int]
    params_before: int
    params: int
    dense_params: int
    predicted_error: float
    rel_error: float | None
    entropy: list[float]


class TruncationJson(_Strict):
    """The MPO parameters of the modules truncate works on, before and after."""

    mpo_before: int
    mpo_after: int
    ratio: float | None = Field(description="`mpo_after` / `mpo_before`")
    dense_equivalent: int = Field(description="what those modules would hold dense")


class InspectModuleJson(_BondRow):
    """One matrix of inspect's report: `kind` mpo (its MPO's structure) or dense (null MPO
    keys; `zeros` and `sparsity` in a pruned model)."""

    name: str
    kind: str
    layer: str | None = None
    shape: list[int]
    dtype: str | None = None
    modes: list[list[int]] | None = None
    padding: list[int] | None = None
    bonds: list[int] | None = None
    central_index: int | None = None
    trainable: list[int] | None = Field(None, description="the core indices that train")
    params: int
    dense_params: int | None = None
    overparam_factor: float | None = None
    rel_error: float | None = None
    predicted_error: float | None = None
    entropy: list[float] | None = None
    tied_keys: list[str] | None = None
    experts: int | None = Field(None, description="an MPOE module's experts")
    role: str | None = Field(None, description="an MPOE module's role in its block (in, out)")
    zeros: int | None = None
    sparsity: float | None = None


class BaseJson(BaseModel):
    """The model an artifact's first stage read (`path`: resolved here)."""

    model_config = ConfigDict(extra="allow")

    name: str
    model_id: str | None
    revision: str | None
    path: AbsPath


class ExpertParamsJson(_Strict):
    """Parameters of the mixtures of experts' matrices."""

    dense: int = Field(description="the matrices as one dense copy")
    shared: int = Field(description="the shared central cores, once")
    per_expert: int = Field(description="one expert's own (auxiliary) cores")
    routers: int
    mpoe: int = Field(description="shared + experts x per_expert + routers")
    dense_experts: int = Field(description="experts dense copies plus the routers")


class InspectExpertsJson(_Strict):
    """An artifact's mixtures of experts: per matrix `experts`, routing `top_k`, `gate`, the
    FFN `blocks` and `matrices` upcycled, their parameters, and the load of a trained one."""

    experts: int
    top_k: int
    gate: str
    blocks: int
    matrices: int
    expert_params: ExpertParamsJson
    load: dict[str, list[float]] | None = Field(description="each block's training load")


class MoeBlockJson(_Strict):
    """One FFN block of `moe`: its router and matrices, each one's role (in, out)."""

    router: str
    matrices: list[str]
    roles: list[str]


class VerifyJson(_Strict):
    """merge --verify: the largest output difference, its tolerance and the outputs' scale."""

    ok: bool
    max_abs_diff: float | None
    tolerance: float | None
    max_abs_value: float | None


class RunStageJson(_Strict):
    """One stage of a run (a swept stage: one per point)."""

    name: str
    point: str | None
    values: dict[str, Any]
    kind: str
    status: str = Field(description="ran, skipped, planned or failed")
    input: ModelRef
    output: OptAbsPath
    seconds: float
    metrics: dict[str, Any] = Field(description="the figures its gates read")
    gates: list[dict[str, Any]]


class SweepJson(_Strict):
    """A sweep's files and figures: `rows` as in the CSV (their `output` resolved)."""

    csv: AbsPath
    png: OptAbsPath
    plot_error: str | None
    metric: str | None
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[dict[str, Any]]


# --- one model per command --------------------------------------------------------------------


class CommandJson(_Strict):
    """What every success object starts with."""

    schema_version: Literal[1] = SCHEMA_VERSION
    command: str
    ok: Literal[True] = True
    error: None = None


class FailureJson(_Strict):
    """The object of a failed command (`mposurgeon.cli.entry.failure`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    command: str | None
    ok: Literal[False] = False
    error: ErrorJson


class DecomposeJson(CommandJson):
    """decompose: the matrices factorized (planned in a dry run: `output` null, `params` of
    the model it would write), `decomposed` their own counts, the modules the input already
    held as MPO (`skipped_already_mpo`)."""

    command: Literal["decompose"] = "decompose"
    input: ModelRef
    output: OptAbsPath
    dry_run: bool
    params: Params
    decomposed: DecomposedJson
    modules: list[DecomposeModuleJson]
    skipped_already_mpo: list[str]


class TruncateJson(CommandJson):
    """truncate: the rule applied (`target`), each module's bonds and counts before and after,
    `truncation` the MPO counts of those modules, the largest predicted (relative to the input
    MPO) and measured (null in a dry run) errors."""

    command: Literal["truncate"] = "truncate"
    input: ModelRef
    output: OptAbsPath
    dry_run: bool
    target: str
    params: Params
    truncation: TruncationJson
    truncated_modules: int
    max_predicted_error: float
    max_rel_error: float | None
    modules: list[TruncateModuleJson]


class SelectJson(CommandJson):
    """select: the scores and choice it recorded (the artifact's selection record's keys)."""

    command: Literal["select"] = "select"
    input: ModelRef
    output: AbsPath
    params: Params
    candidates: int
    batches: int | None
    examples: int | None
    seconds: float
    method: str | None
    weight_types: list[str]
    top_n: int | None
    split_num: int | None
    seed: int | None
    data: dict[str, Any] | None = Field(description="the data scored: path, sha256")
    scores: dict[str, float]
    patterns: dict[str, str]
    chosen: list[str]
    schedule: dict[str, Any] | None


#: The keys of an artifact's selection record that `SelectJson` reports.
SELECTION_KEYS = (
    "method",
    "weight_types",
    "top_n",
    "split_num",
    "seed",
    "data",
    "scores",
    "patterns",
    "chosen",
    "schedule",
)


class TrainJson(CommandJson):
    """train: the run's metrics (steps, losses, evaluations, counts; a dry run's counts on the
    meta device, then `params` has only `total`, `before`, `trainable`, `trainable_head`), the
    warnings shown, and the Hub commit of --push-to-hub."""

    command: Literal["train"] = "train"
    input: ModelRef
    output: OptAbsPath
    dry_run: bool
    params: Params
    metrics: dict[str, Any] = Field(description="the run's metrics, as the manifest records")
    warnings: list[str]
    commit_url: str | None


class EvalJson(CommandJson):
    """eval: the task, a classifier's label names, and the scores (`metrics`: accuracy,
    macro_f1, mcc, pearson, spearman, loss, perplexity, exact_match as the task has them, rows,
    tokens)."""

    command: Literal["eval"] = "eval"
    input: ModelRef
    params: None = None
    data: dict[str, Any] = Field(description="what was read: a file's path and sha256, ...")
    task: str
    labels: list[str]
    metrics: dict[str, Any]


class MergeJson(CommandJson):
    """merge: the modules made dense, the --verify comparison (null without it), a PEFT
    adapter's type and base, the MoE class experts were written as, the Hub commit."""

    command: Literal["merge"] = "merge"
    input: ModelRef
    output: AbsPath
    params: Params
    merged_modules: int
    verify: VerifyJson | None
    peft_type: str | None = Field(description="a merged PEFT adapter's type (LORA, IA3)")
    base: OptModelRef = Field(description="the base model a PEFT adapter was merged into")
    architecture: str | None = Field(description="the MoE class experts were written as")
    commit_url: str | None


class InspectJson(CommandJson):
    """inspect: what the model is (`kind`, an artifact's `format_version`, `stage`, `lineage`,
    `base`), its counts (`params`; `multiply_adds` of MPO layers), every matrix (`modules`),
    and what stages recorded: `selection`, `metrics` (train, merge --verify), `pruning`,
    `experts`; `plot` the PNG drawn by --plot (each null when absent)."""

    command: Literal["inspect"] = "inspect"
    input: AbsPath
    kind: str = Field(description="artifact, hf or safetensors")
    name: str
    model_id: str | None
    format_version: int | None
    stage: str | None
    lineage: list[dict[str, Any]] = Field(
        description="an artifact's stages as recorded: each one's options as given to it "
        "(an `output` relative to where it ran)"
    )
    base: BaseJson | None = Field(description="an artifact's base model")
    params: Params
    multiply_adds: dict[str, int] | None = Field(
        description="MPO layers: contract_per_row, reconstruct, dense_per_row"
    )
    modules: list[InspectModuleJson]
    selection: dict[str, Any] | None
    metrics: dict[str, Any] | None
    pruning: dict[str, Any] | None
    experts: InspectExpertsJson | None
    plot: OptAbsPath


class MoeJson(CommandJson):
    """moe: the experts per matrix, routing, blocks, and the counts of the upcycled matrices
    (`expert_params`); a dry run's `params` has only `before` (a matrix the input holds as MPO
    cores leaves with them: the total is not planned)."""

    command: Literal["moe"] = "moe"
    input: ModelRef
    output: OptAbsPath
    dry_run: bool
    params: Params
    experts: int
    top_k: int
    gate: str
    blocks: list[MoeBlockJson]
    expert_params: ExpertParamsJson


class PruneJson(CommandJson):
    """prune: unstructured (`matrices` zeroed, `pruned`, `sparsity`) or structured (`units`
    removed or masked per kind: heads, FFN neurons); `params.total` the count after removal."""

    command: Literal["prune"] = "prune"
    input: ModelRef
    output: OptAbsPath
    dry_run: bool
    params: Params
    mode: str = Field(description="unstructured or structured")
    matrices: list[dict[str, Any]]
    units: list[dict[str, Any]]
    pruned: int | None = Field(description="weights zeroed (unstructured)")
    sparsity: float | None = Field(description="`pruned` / the targeted weights")


class ExportPeftJson(CommandJson):
    """export-peft: the method exported, PEFT's type and task type, the modules, the base
    model the adapter names."""

    command: Literal["export-peft"] = "export-peft"
    input: ModelRef
    output: AbsPath
    params: None = None
    method: str
    peft_type: str
    modules: int
    base_model: ModelRef
    task_type: str | None


class RunJson(CommandJson):
    """run: the stages so far whatever happens; `ok` false with `error` on a failure."""

    command: Literal["run"] = "run"
    ok: bool = True  # type: ignore[assignment]
    error: ErrorJson | None = None  # type: ignore[assignment]
    recipe: AbsPath
    workdir: AbsPath
    params: None = None
    stages: list[RunStageJson]
    sweep: SweepJson | None


#: Each command's model (`mposurgeon.cli.entry.COMMANDS`, one each).
SCHEMAS: dict[str, type[CommandJson]] = {
    "decompose": DecomposeJson,
    "truncate": TruncateJson,
    "select": SelectJson,
    "train": TrainJson,
    "eval": EvalJson,
    "merge": MergeJson,
    "inspect": InspectJson,
    "moe": MoeJson,
    "prune": PruneJson,
    "run": RunJson,
    "export-peft": ExportPeftJson,
}


def build(schema: type[CommandJson], **fields: Any) -> dict[str, Any]:
    """The JSON-able object of `schema` built from `fields`. A field that does not fit is a
    bug of the command: raised as RuntimeError (an internal error), not as bad user input."""
    try:
        return schema(**fields).model_dump(mode="json")
    except ValidationError as exc:
        raise RuntimeError(f"the --json object does not fit {schema.__name__}: {exc}") from None


def emit(schema: type[CommandJson], **fields: Any) -> None:
    """Print the object of `schema` built from `fields` on stdout (`build`)."""
    print_json(build(schema, **fields))
