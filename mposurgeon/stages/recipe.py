"""run: a YAML recipe of stages, validated whole before any work, resumable, with CI gates.

    version: 1
    model: minilm                      # path, hub id or alias
    workdir: mposurgeon-out            # optional
    stages:
      - decompose: {layers: [FFN_1, FFN_2, attention]}
        expect: {max_rel_error: 1.0e-5}
      - inspect: {}
      - merge: {verify: true}

Each stage is one command with that command's options under the same names (`rel_tol` or
`rel-tol`). Stage i reads the output of the last stage before it that wrote an artifact and
writes `<workdir>/<recipe name>/<i>-<stage name>/`. A stage whose output exists with the same
input (manifest sha256) and options is skipped, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mposurgeon.artifact.manifest import MANIFEST_NAME, Manifest, manifest_sha256, read_manifest
from mposurgeon.errors import ArtifactError, ModelNotFoundError, UsageError, VerificationError
from mposurgeon.stages.common import ProgressCallback, StageOptions, default_workdir

#: stage kind -> (module, options class, function); `inspect` writes nothing and has no options.
STAGES: dict[str, tuple[str, str, str]] = {
    "decompose": ("mposurgeon.stages.decompose", "DecomposeOptions", "decompose"),
    "truncate": ("mposurgeon.stages.truncate", "TruncateOptions", "truncate"),
    "select": ("mposurgeon.stages.select", "SelectOptions", "select"),
    "train": ("mposurgeon.stages.train", "TrainOptions", "train"),
    "merge": ("mposurgeon.stages.merge", "MergeOptions", "merge"),
}
INSPECT = "inspect"
#: options the runner sets itself: the chain of outputs is its business.
RUNNER_OPTIONS = {"output", "workdir", "overwrite", "dry_run"}


class Expectations(BaseModel):
    """CI gates on a stage's output; a failed one makes `run` exit 3."""

    model_config = ConfigDict(extra="forbid")

    max_rel_error: float | None = None
    max_predicted_error: float | None = None
    max_params_ratio: float | None = None
    max_mpo_ratio: float | None = None
    min_eval_accuracy: float | None = None
    max_merge_diff: float | None = None


@dataclass
class RecipeStage:
    index: int
    name: str
    kind: str
    options: dict[str, Any]
    expect: Expectations

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"


@dataclass
class Recipe:
    path: Path
    model: str
    workdir: Path
    stages: list[RecipeStage]

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class GateResult:
    condition: str
    limit: float
    measured: float | None
    ok: bool


@dataclass
class StageReport:
    name: str
    kind: str
    status: str  # "ran" | "skipped" | "planned" | "failed"
    input: str
    output: str | None
    seconds: float = 0.0
    gates: list[GateResult] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    result: Any = None


@dataclass
class RecipeReport:
    recipe: str
    workdir: str
    stages: list[StageReport]
    failed_gate: tuple[str, GateResult] | None = None


#: events(stage, status): called when a stage starts ("start") and ends (its status).
StageEvents = Callable[[RecipeStage, str], None]


# --- loading and validating ------------------------------------------------------------------


def load_recipe(path: str | Path, workdir: Path | None = None) -> Recipe:
    """Parse and validate the whole recipe; errors name the stage and the key."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such recipe file: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path.name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path.name}: a recipe is a mapping with version, model and stages")
    _check_keys(raw, {"version", "model", "workdir", "stages", "description"}, f"{path.name}")
    if raw.get("version") != 1:
        raise UsageError(f"{path.name}: version must be 1 (got {raw.get('version')!r})")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise UsageError(f"{path.name}: 'model' must name a model (path, hub id or alias)")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UsageError(f"{path.name}: 'stages' must be a non-empty list")
    base = path.parent
    model = _relative_path(raw["model"], base)
    chosen_workdir = workdir or (
        _resolve_path(raw["workdir"], base) if raw.get("workdir") else default_workdir()
    )
    stages = [_stage(i, item, base) for i, item in enumerate(stages_raw, 1)]
    names = [s.name for s in stages]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UsageError(
            f"{path.name}: stage names repeat: {', '.join(sorted(duplicates))}",
            hint="give repeated stages a `name:`",
        )
    return Recipe(path=path, model=model, workdir=chosen_workdir, stages=stages)


def _stage(index: int, item: Any, base: Path) -> RecipeStage:
    where = f"stage {index}"
    if not isinstance(item, dict):
        raise UsageError(f"{where}: expected a mapping like `decompose: {{...}}`")
    kinds = [k for k in item if k not in ("name", "expect")]
    if len(kinds) != 1:
        raise UsageError(f"{where}: name exactly one stage (found {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    if kind not in STAGES and kind != INSPECT:
        raise UsageError(
            f"{where}: unknown stage {kind!r}{_did_you_mean(kind, [*STAGES, INSPECT])}"
        )
    name = str(item.get("name") or kind)
    where = f"stage {index} ({name})"
    options = item[kind] or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options must be a mapping")
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    for key in options:
        if key in RUNNER_OPTIONS:
            raise UsageError(f"{where}: option '{key}' is set by `run` itself; remove it")
    if kind == INSPECT:
        _check_keys(options, {"verify_checksums"}, where)
    else:
        options = _resolve_paths(options, base)
        _validate_options(kind, options, where)
    try:
        expect = Expectations.model_validate(item.get("expect") or {})
    except ValidationError as exc:
        message = _first_error(exc, list(Expectations.model_fields))
        raise UsageError(f"{where}: expect: {message}") from None
    return RecipeStage(index=index, name=name, kind=kind, options=options, expect=expect)


def options_class(kind: str) -> type[StageOptions]:
    module, cls, _ = STAGES[kind]
    try:
        return getattr(import_module(module), cls)
    except ImportError as exc:  # a stage this build does not ship yet
        raise UsageError(f"stage '{kind}' is not available in this build ({exc})") from None


def _validate_options(kind: str, options: dict[str, Any], where: str) -> None:
    cls = options_class(kind)
    try:
        cls.model_validate(options)
    except ValidationError as exc:
        raise UsageError(f"{where}: {_first_error(exc, list(cls.model_fields))}") from None


def _first_error(exc: ValidationError, fields: list[str]) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return f"unknown option '{key}'{_did_you_mean(key, fields)}"
    return f"option '{key}': {err.get('msg')}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_keys(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise UsageError(f"{where}: unknown key '{key}'{_did_you_mean(key, sorted(allowed))}")


def _resolve_path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _relative_path(value: str, base: Path) -> str:
    """A model given as a path relative to the recipe file, if it exists there."""
    candidate = base / value
    return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value


def _resolve_paths(options: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data files and the like are relative to the recipe file."""
    out = dict(options)
    for key in ("data", "eval_data", "cache_dir"):
        if isinstance(out.get(key), str):
            out[key] = str(_resolve_path(out[key], base))
    return out


# --- running ---------------------------------------------------------------------------------


def run_recipe(
    path: str | Path,
    *,
    workdir: Path | None = None,
    dry_run: bool = False,
    force: bool = False,
    from_stage: str | None = None,
    events: StageEvents | None = None,
    progress: ProgressCallback | None = None,
) -> RecipeReport:
    """Run (or plan) every stage of the recipe at `path`; stop at the first failed gate."""
    recipe = load_recipe(path, workdir)
    if from_stage is not None and from_stage not in [s.name for s in recipe.stages]:
        names = [s.name for s in recipe.stages]
        raise UsageError(
            f"--from {from_stage}: no such stage{_did_you_mean(from_stage, names)}",
            hint=f"stages: {', '.join(names)}",
        )
    report = RecipeReport(recipe=str(recipe.path), workdir=str(recipe.workdir), stages=[])
    current = recipe.model
    rerun = force
    base_params: int | None = None
    for stage in recipe.stages:
        rerun = rerun or stage.name == from_stage
        out = None if stage.kind == INSPECT else _output_dir(recipe, stage)
        entry = StageReport(stage.name, stage.kind, "planned", current, str(out) if out else None)
        report.stages.append(entry)
        up_to_date = out is not None and not rerun and _up_to_date(out, stage, current)
        if dry_run:
            entry.status = "skipped" if up_to_date else "planned"
            if out is not None:
                current = str(out)
            continue
        if events:
            events(stage, "start")
        start = time.perf_counter()
        if up_to_date:
            entry.status = "skipped"
        else:
            entry.result = _execute(stage, current, out, progress)
            entry.status = "ran"
        entry.seconds = time.perf_counter() - start
        if out is not None:
            current = str(out)
        if base_params is None:
            base_params = _total_params(recipe.model)
        entry.metrics = _measure(stage, current, entry.result, base_params)
        entry.gates = _gates(stage.expect, entry.metrics)
        if events:
            events(stage, entry.status)
        if progress:
            progress("recipe", stage.index, len(recipe.stages))
        failed = next((g for g in entry.gates if not g.ok), None)
        if failed is not None:
            report.failed_gate = (stage.name, failed)
            entry.status = "failed"
            break
    return report


def _output_dir(recipe: Recipe, stage: RecipeStage) -> Path:
    return recipe.workdir / recipe.name / f"{stage.index:02d}-{stage.name}"


def _input_identity(model: str) -> str | None:
    """The manifest sha256 of an artifact input, else None (a checkpoint: compared by path)."""
    path = Path(model)
    return manifest_sha256(path) if (path / MANIFEST_NAME).is_file() else None


def _up_to_date(out: Path, stage: RecipeStage, current: str) -> bool:
    """The stage's output exists and was made from the same input with the same options."""
    try:
        manifest = read_manifest(out)
    except (ArtifactError, OSError):
        return False
    if manifest.stage != stage.kind:
        return False
    expected = options_class(stage.kind)(**stage.options, output=out).model_dump(mode="json")
    recorded = dict(manifest.options)
    for key in RUNNER_OPTIONS:
        expected.pop(key, None)
        recorded.pop(key, None)
    if expected != recorded:
        return False
    parent_sha = _input_identity(current)
    if parent_sha is not None:
        return manifest.parent is not None and manifest.parent.manifest_sha256 == parent_sha
    return manifest.parent is None and _same_base(manifest, current)


def _same_base(manifest: Manifest, current: str) -> bool:
    from mposurgeon.artifact.resolve import resolve_model

    try:
        resolved = resolve_model(current)
    except Exception:  # noqa: BLE001 - unresolvable now: not up to date
        return False
    return manifest.base.path == str(resolved.path) and manifest.base.revision == resolved.revision


def _execute(stage: RecipeStage, current: str, out: Path | None, progress: Any) -> Any:
    if stage.kind == INSPECT:
        from mposurgeon.stages.inspect import inspect

        return inspect(current, verify=stage.options.get("verify_checksums", True))
    module, _, function = STAGES[stage.kind]
    run = getattr(import_module(module), function)
    options = options_class(stage.kind)(**stage.options, output=out, overwrite=True)
    return run(current, options, progress=progress)


def _total_params(model: str) -> int | None:
    from mposurgeon.stages.inspect import inspect

    try:
        return int(inspect(model, verify=False)["params"]["total"])
    except Exception:  # noqa: BLE001 - a ratio gate then reports "not measured"
        return None


def _measure(stage: RecipeStage, current: str, result: Any, base_params: int | None) -> dict:
    """The figures gates look at, read from the stage's output."""
    metrics: dict[str, Any] = {}
    if stage.kind == INSPECT:
        return metrics
    manifest = read_manifest(Path(current))
    errors = [m.rel_error for m in manifest.modules.values() if m.rel_error is not None]
    predicted = [
        m.predicted_error for m in manifest.modules.values() if m.predicted_error is not None
    ]
    metrics["max_rel_error"] = max(errors) if errors else None
    metrics["max_predicted_error"] = max(predicted) if predicted else None
    from mposurgeon.stages.inspect import inspect

    params = inspect(current, verify=False)["params"]
    metrics["params"] = params["total"]
    metrics["params_ratio"] = params["total"] / base_params if base_params else None
    metrics["mpo_ratio"] = params.get("mpo_ratio")
    recorded = manifest.metrics or {}
    metrics["eval_accuracy"] = recorded.get("eval_accuracy")
    verify = recorded.get("verify") or {}
    metrics["merge_diff"] = verify.get("max_abs_diff")
    return metrics


_GATES = {
    "max_rel_error": ("max_rel_error", max),
    "max_predicted_error": ("max_predicted_error", max),
    "max_params_ratio": ("params_ratio", max),
    "max_mpo_ratio": ("mpo_ratio", max),
    "min_eval_accuracy": ("eval_accuracy", min),
    "max_merge_diff": ("merge_diff", max),
}


def _gates(expect: Expectations, metrics: dict[str, Any]) -> list[GateResult]:
    results = []
    for condition, limit in expect.model_dump().items():
        if limit is None:
            continue
        key, kind = _GATES[condition]
        measured = metrics.get(key)
        ok = measured is not None and (measured <= limit if kind is max else measured >= limit)
        results.append(GateResult(condition, limit, measured, ok))
    return results


def gate_failure(report: RecipeReport) -> VerificationError | None:
    """The error `run` exits with when a gate failed (exit code 3), else None."""
    if report.failed_gate is None:
        return None
    stage, gate = report.failed_gate
    measured = "not measured" if gate.measured is None else f"{gate.measured:.6g}"
    return VerificationError(
        f"stage {stage}: expect {gate.condition}: {gate.limit:g} failed (measured {measured})",
        hint="the stage's output is kept for inspection; later stages did not run",
    )
