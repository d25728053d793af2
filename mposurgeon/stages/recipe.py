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
writes `<workdir>/<recipe name>/<i>-<stage name>/`; `inspect` and `eval` write nothing (they
report on that output, and always run: `eval: {data: eval.jsonl}` with
`expect: {min_eval_accuracy: 0.9}` gates on its accuracy). A stage whose output exists with
the same input (manifest sha256), options and data files (sha256 of `data`, `eval_data`,
recorded in `<workdir>/<recipe name>/.state.json`) is skipped, so a re-run resumes where it
stopped; once a stage runs, every later one runs too. Paths are made absolute (symbolic links
resolved) when the recipe loads, so the same recipe gives the same plan whatever the spelling
of its path.

A recipe is untrusted input. It is at most `MAX_RECIPE_BYTES` of UTF-8 YAML, without aliases
(`*name`: a recipe has no use for them, and they make "billion laughs" bombs) and nested at
most `MAX_DEPTH` deep. Its file name (the recipe name) and every stage name are one safe path
component (`SAFE_NAME`), so nothing it writes leaves `<workdir>/<recipe name>/` (checked again
on the resolved output, against symbolic links). No stage output may be, lie inside or contain
the recipe's model or a data file: a recipe never replaces its own input.

A stage that writes an artifact can be swept (not `inspect` or `eval`):

      - train: {method: apet, data: train.jsonl, eval_data: eval.jsonl}
        name: apet
        sweep: {budget: [4096, 16384], seed: [0, 1]}

runs the stage once per point of the cartesian product of the lists (the first key outermost:
budget 4096 with seeds 0 and 1, then budget 16384), with the point's values as options (`-` or
`_` in their names, as elsewhere). A swept option may not also be set in the stage's options;
every point is validated whole when the recipe loads (an error names the stage and the point),
and a stage has at most `MAX_SWEEP_POINTS` points. Each point writes
`<workdir>/<recipe name>/<i>-<stage name>/<point id>/`, the id naming its values
(`budget-4096.seed-0`; a value that is no safe path text, such as a file path, is named by its
position: `data-v2`), and is skipped, resumed, forced and planned like any stage; `expect:`
gates every point. A swept stage does not move the chain: the stage after it reads the input
the swept stage read, so several sweeps in a row (one per method) start from the same model.

After the run (also when every point was skipped; not on a dry run or an error) the runner
writes, beside the outputs, `sweep.csv`: one row per point of every swept stage (stage, point,
method, the swept values, `trainable_params` without the task head and `trainable_head`, the
`eval_*` metrics the point's manifest records, the seconds its run took, its output), and
`sweep.png`: the main metric (`eval_accuracy`, else the first `eval_*` metric recorded) against
trainable parameters on a log axis, one line per swept stage, at the mean over the seeds
(`seed` and `budget_seed` values: `SEED_OPTIONS`) with their min..max as error bars. A point
without the metric is left out of the plot; when nothing can be drawn (or matplotlib is
missing) the CSV still lands and the report says why there is no plot.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mposurgeon.artifact.manifest import MANIFEST_NAME, Manifest, manifest_sha256, read_manifest
from mposurgeon.artifact.resolve import HUB_ID, is_path_like
from mposurgeon.errors import (
    ArtifactError,
    ModelNotFoundError,
    MposurgeonError,
    UsageError,
    VerificationError,
)
from mposurgeon.plot import NOT_METRICS, SweepLine, SweepSample
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import InputOptions, default_workdir
from mposurgeon.stages.registry import BY_NAME
from mposurgeon.training.data import data_fingerprint

#: the stage without an options class: its only option is `verify_checksums`.
INSPECT = "inspect"
#: options the runner sets itself: the chain of outputs is its business.
RUNNER_OPTIONS = {"output", "workdir", "overwrite", "dry_run"}
#: options naming files a stage reads: their sha256 is part of the skip key.
DATA_OPTIONS = ("data", "eval_data")
#: options holding paths, relative to the recipe file.
PATH_OPTIONS = (*DATA_OPTIONS, "cache_dir")
#: a recipe or stage name: one path component, not hidden, never "." or "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
SAFE_NAME_RULE = "letters, digits, '.', '_' or '-', not starting with '.', at most 64"
#: the largest recipe file read, and the deepest nesting of its YAML.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
#: the runner's record of the data each stage output was made from, in the recipe's directory.
STATE_NAME = ".state.json"
#: the keys of a stage's entry besides the stage itself.
ENTRY_KEYS = ("name", "expect", "sweep")
#: the most points one swept stage may have.
MAX_SWEEP_POINTS = 256
#: swept options whose values repeat a run with other randomness: the plot averages over them.
SEED_OPTIONS = ("seed", "budget_seed")
#: a sweep point's id (`budget-4096.seed-0`, its output directory's name) and one value's text.
POINT_ID = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}")
_VALUE_TEXT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,39}")
#: what a recipe with swept stages writes beside its outputs.
SWEEP_CSV, SWEEP_PNG = "sweep.csv", "sweep.png"


class Expectations(BaseModel):
    """CI gates on a stage's output; a failed one makes `run` exit 3."""

    model_config = ConfigDict(extra="forbid")

    max_rel_error: float | None = None
    max_predicted_error: float | None = None
    max_params_ratio: float | None = None
    max_mpo_ratio: float | None = None
    min_eval_accuracy: float | None = None
    min_eval_macro_f1: float | None = None
    min_eval_mcc: float | None = None
    min_eval_pearson: float | None = None
    min_eval_spearman: float | None = None
    min_eval_exact_match: float | None = None
    max_eval_loss: float | None = None
    max_eval_perplexity: float | None = None
    max_merge_diff: float | None = None


@dataclass(frozen=True)
class SweepPoint:
    """One point of a stage's sweep: its id (`budget-4096.seed-0`, the name of its output
    directory) and the option values it sets (paths made absolute)."""

    id: str
    values: dict[str, Any]


@dataclass
class RecipeStage:
    """One stage of a recipe. A swept stage has `sweep` (option -> values, as written) and
    `points` (their cartesian product); `runs()` gives it once per point, each with `point`
    set and the point's values in `options`."""

    index: int
    name: str
    kind: str
    options: dict[str, Any]
    expect: Expectations
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    points: list[SweepPoint] = field(default_factory=list)
    point: SweepPoint | None = None

    @property
    def label(self) -> str:
        if self.point is not None:
            return f"stage {self.index} ({self.name}, {self.point.id})"
        return f"stage {self.index} ({self.name})"

    def runs(self) -> list[RecipeStage]:
        """What runs for this stage: itself, or (swept) one stage per point, in order."""
        if self.point is not None or not self.sweep:
            return [self]
        return [
            replace(self, options={**self.options, **p.values}, points=[], point=p)
            for p in self.points
        ]


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
    point: str | None = None  # a swept stage's point id
    values: dict[str, Any] = field(default_factory=dict)  # the values the point sets


@dataclass
class SweepReport:
    """What a recipe with swept stages wrote: `csv` (one row per point: `columns` order,
    `rows` as written, None for an empty cell), `png` (None when not drawn: `plot_error` says
    why), the `metric` plotted, and the `lines` drawn (mean, min, max over seeds per x)."""

    csv: str
    png: str | None
    plot_error: str | None
    metric: str | None
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[SweepLine] = field(default_factory=list)


@dataclass
class RecipeReport:
    recipe: str
    workdir: str
    stages: list[StageReport]  # one per stage, a swept stage one per point
    failed_gate: tuple[str, GateResult] | None = None  # (the stage's label, the gate)
    sweep: SweepReport | None = None  # when the recipe sweeps (not on a dry run)


#: events(stage, status): called when a stage starts ("start") and ends (its status).
StageEvents = Callable[[RecipeStage, str], None]


# --- loading and validating ------------------------------------------------------------------


class _Refused(Exception):
    """YAML that parses but that a recipe refuses (an alias, too deep)."""


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases, with at most `MAX_DEPTH` levels of nesting and
    without repeated keys in a mapping (YAML would keep the last one silently)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"line {line}: aliases (*{event.anchor}) are not allowed in a recipe")
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"line {line}: nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if first is not None:
                    where = f" (first on line {first})" if first != line else ""
                    raise _Refused(f"line {line}: key {_show(key)} repeats{where}")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """The recipe file parsed: bounded in size and depth, UTF-8, no aliases."""
    name = _shown_path(path.name)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read recipe {_shown_path(path)}: {exc.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UsageError(f"{name} is larger than {MAX_RECIPE_BYTES} bytes; not a recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"{name} is not UTF-8 text (line {line})") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader
    except _Refused as exc:
        raise UsageError(f"{name}: {exc}") from None
    except yaml.YAMLError as exc:
        first = (str(exc).splitlines() or ["unreadable"])[0]
        raise UsageError(f"{name} is not valid YAML: {first}") from None
    except RecursionError:  # nesting in a scalar's tags or the like: the loader's own limit
        raise UsageError(f"{name}: nested too deeply") from None


def load_recipe(path: str | Path, workdir: Path | None = None) -> Recipe:
    """Parse and validate the whole recipe; errors name the stage and the key.

    Paths are made absolute here, so the recipe's outputs and skip keys do not depend on how
    its path was spelled; outputs are checked against the model and the data files."""
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise ModelNotFoundError(f"no such recipe file: {_shown_path(path)}")
    raw = _read_yaml(path)
    where = _shown_path(path.name)
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: a recipe is a mapping with version, model and stages")
    _check_keys(raw, {"version", "model", "workdir", "stages", "description"}, where)
    version = raw.get("version")
    if type(version) is not int or version != 1:
        raise UsageError(f"{where}: version must be 1 (got {_show(version)})")
    if not isinstance(raw.get("model"), str) or not raw["model"].strip():
        raise UsageError(f"{where}: 'model' must name a model (path, hub id or alias)")
    _no_nul(raw["model"], f"{where}: 'model'")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UsageError(f"{where}: 'stages' must be a non-empty list")
    if not SAFE_NAME.fullmatch(path.stem):
        raise UsageError(
            f"{where}: the recipe name {_show(path.stem)} (its file name) is not one safe "
            f"path component ({SAFE_NAME_RULE} characters)",
            hint="rename the recipe file",
        )
    base = path.parent
    model = _model_path(raw["model"], base)
    if workdir is not None:
        chosen_workdir = _path(str(workdir), Path.cwd(), "--workdir")
    elif raw.get("workdir") is not None:
        chosen_workdir = _path(raw["workdir"], base, f"{where}: 'workdir'")
    else:
        chosen_workdir = _path(str(default_workdir()), Path.cwd(), "the default workdir")
    stages = [_stage(i, item, base) for i, item in enumerate(stages_raw, 1)]
    names = [s.name for s in stages]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UsageError(
            f"{where}: stage names repeat: {', '.join(sorted(duplicates))}",
            hint="give repeated stages a `name:`",
        )
    recipe = Recipe(path=path, model=model, workdir=chosen_workdir, stages=stages)
    _check_outputs(recipe)
    return recipe


def _stage(index: int, item: Any, base: Path) -> RecipeStage:
    where = f"stage {index}"
    if not isinstance(item, dict):
        raise UsageError(f"{where}: expected a mapping like `decompose: {{...}}`")
    for key in item:
        if not isinstance(key, str):
            raise UsageError(
                f"{where}: key {_show(key)} is not a string; name a stage, 'name', 'expect' "
                "or 'sweep'"
            )
    kinds = [k for k in item if k not in ENTRY_KEYS]
    if len(kinds) != 1:
        found = ", ".join(_show(k) for k in kinds) or "none"
        raise UsageError(f"{where}: name exactly one stage (found {found})")
    kind = kinds[0]
    if kind not in BY_NAME:
        raise UsageError(
            f"{where}: unknown stage {_show(kind)}{_did_you_mean(kind, list(BY_NAME))}"
        )
    name = _stage_name(item.get("name"), kind, where)
    where = f"stage {index} ({name})"
    options = item[kind] or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options must be a mapping")
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    for key in options:
        if key in RUNNER_OPTIONS:
            raise UsageError(f"{where}: option '{key}' is set by `run` itself; remove it")
    sweep: dict[str, list[Any]] = {}
    points: list[SweepPoint] = []
    if item.get("sweep") is not None and not BY_NAME[kind].writes:
        raise UsageError(
            f"{where}: `{kind}` writes no artifact and cannot be swept",
            hint="sweep a stage that writes one (train, decompose, truncate, ...)",
        )
    if kind == INSPECT:
        _check_keys(options, {"verify_checksums"}, where)
    elif item.get("sweep") is not None:
        options = _resolve_paths(options, base, where)
        sweep = _sweep(kind, item["sweep"], options, where)
        points = _points(kind, sweep, options, base, where)
    else:
        options = _resolve_paths(options, base, where)
        _validate_options(kind, options, where)
    try:
        expect = Expectations.model_validate(item.get("expect") or {})
    except ValidationError as exc:
        message = _first_error(exc, list(Expectations.model_fields))
        raise UsageError(f"{where}: expect: {message}") from None
    return RecipeStage(
        index=index,
        name=name,
        kind=kind,
        options=options,
        expect=expect,
        sweep=sweep,
        points=points,
    )


def _sweep(kind: str, raw: Any, options: dict[str, Any], where: str) -> dict[str, list[Any]]:
    """A stage's `sweep:` checked: option names of the stage (not set in its options, not the
    runner's), each with a non-empty list of distinct values, at most `MAX_SWEEP_POINTS`
    points in all."""
    example = "like `sweep: {seed: [0, 1]}`"
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{where}: sweep must map options to lists of values, {example}")
    fields = sorted(options_class(kind).model_fields)
    sweep: dict[str, list[Any]] = {}
    for key, values in raw.items():
        if not isinstance(key, str):
            raise UsageError(f"{where}: sweep: key {_show(key)} is not an option name")
        name = key.replace("-", "_")
        if name in RUNNER_OPTIONS:
            raise UsageError(f"{where}: sweep: option '{name}' is set by `run` itself; remove it")
        if name not in fields:
            raise UsageError(
                f"{where}: sweep: unknown option {_show(key)}{_did_you_mean(name, fields)}"
            )
        if name in sweep:
            raise UsageError(f"{where}: sweep: option '{name}' is given twice")
        if name in options:
            raise UsageError(
                f"{where}: option '{name}' is both set and swept",
                hint="remove it from the stage's options or from its sweep",
            )
        if not isinstance(values, list) or not values:
            raise UsageError(
                f"{where}: sweep: '{name}' must be a non-empty list of values "
                f"(got {_show(values)}), {example}"
            )
        seen: set[str] = set()
        for value in values:
            if not _sweep_value(value):
                raise UsageError(
                    f"{where}: sweep: '{name}': {_show(value)} is not a number, string, "
                    "boolean, null or list of them"
                )
            text = json.dumps(value)
            if text in seen:
                raise UsageError(f"{where}: sweep: '{name}' lists {_show(value)} twice")
            seen.add(text)
        sweep[name] = values
    count = 1
    for values in sweep.values():
        count *= len(values)
    if count > MAX_SWEEP_POINTS:
        raise UsageError(
            f"{where}: sweep has {count} points, more than {MAX_SWEEP_POINTS}",
            hint="sweep fewer values, or split the stage into several stages",
        )
    return sweep


def _sweep_value(value: Any, nested: bool = False) -> bool:
    """A scalar of YAML (number, string without NUL, boolean, null) or a flat list of them."""
    if isinstance(value, list) and not nested:
        return all(_sweep_value(v, nested=True) for v in value)
    if isinstance(value, str):
        return "\0" not in value
    return value is None or isinstance(value, (bool, int, float))


def _points(
    kind: str, sweep: dict[str, list[Any]], options: dict[str, Any], base: Path, where: str
) -> list[SweepPoint]:
    """The cartesian product of the sweep (first key outermost), each point validated whole
    with the stage's options; path values made absolute like the stage's own."""
    texts = {key: _value_texts(values) for key, values in sweep.items()}
    points = []
    for combo in itertools.product(*(range(len(values)) for values in sweep.values())):
        point_id = ".".join(f"{key}-{texts[key][i]}" for key, i in zip(sweep, combo, strict=True))
        if not POINT_ID.fullmatch(point_id):
            raise UsageError(
                f"{where}: sweep point ids are longer than 200 characters ({point_id[:40]}...)",
                hint="sweep fewer options in one stage",
            )
        at = f"{where}: sweep point {point_id}"
        values = {key: sweep[key][i] for key, i in zip(sweep, combo, strict=True)}
        values = _resolve_paths(values, base, at)
        _validate_point(kind, {**options, **values}, set(sweep), where, at)
        points.append(SweepPoint(point_id, values))
    return points


def _value_texts(values: list[Any]) -> list[str]:
    """How each value reads in a point id: its text when every one is safe path text and they
    differ (case folded), else its position (`v1`, `v2`, ...)."""
    texts = [_value_text(v) for v in values]
    folded = {t.lower() for t in texts if t is not None}
    if None in texts or len(folded) < len(texts):
        return [f"v{i}" for i in range(1, len(values) + 1)]
    return [t for t in texts if t is not None]


def _value_text(value: Any) -> str | None:
    """`9216`, `0.5`, `true`, `none`, `lora`, `FFN_1+attention`; None: not safe path text."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "none"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, list):
        parts = [_value_text(v) for v in value]
        if None in parts:
            return None
        text = "+".join(p for p in parts if p is not None)
    else:
        text = str(value)
    return text if _VALUE_TEXT.fullmatch(text) else None


def _validate_point(
    kind: str, options: dict[str, Any], swept: set[str], where: str, at: str
) -> None:
    """Validate one point's options; an error about an option that is not swept names the
    stage only (every point has it), any other one the point too."""
    cls = options_class(kind)
    try:
        cls.model_validate(options)
    except ValidationError as exc:
        loc = exc.errors()[0].get("loc", ())
        key = str(loc[0]) if loc else None
        shown = where if key is not None and key not in swept else at
        raise UsageError(f"{shown}: {_first_error(exc, list(cls.model_fields))}") from None


def _stage_name(value: Any, kind: str, where: str) -> str:
    """A stage's `name:` (default: its kind), one safe path component."""
    if value is None:
        return kind
    if not isinstance(value, str):
        raise UsageError(f"{where}: 'name' must be a string (got {type(value).__name__})")
    _no_nul(value, f"{where}: 'name'")
    if not SAFE_NAME.fullmatch(value):
        raise UsageError(
            f"{where}: 'name' {_show(value)} is not one safe path component "
            f"({SAFE_NAME_RULE} characters)",
            hint="a stage's name becomes the name of its output directory",
        )
    return value


def options_class(kind: str) -> type[InputOptions]:
    """The options class of stage `kind` (a `StageOptions` for one that writes an artifact)."""
    try:
        return BY_NAME[kind].options_class()
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
        return f"unknown option {_show(key)}{_did_you_mean(key, fields)}"
    message = " ".join(str(err.get("msg")).split()).removeprefix("Value error, ")
    if not key:  # a check of the options together
        return message
    return f"option {_show(key)}: {message}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_keys(mapping: dict[Any, Any], allowed: set[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            hint = _did_you_mean(key, sorted(allowed)) if isinstance(key, str) else ""
            raise UsageError(f"{where}: unknown key {_show(key)}{hint}")


def _show(value: Any, limit: int = 40) -> str:
    """A short one-line rendering of a value from the recipe for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown_path(path: Path | str) -> str:
    """A path for a message, with control characters escaped (one line whatever its name)."""
    text = str(path)
    return text if text.isprintable() else repr(text)[1:-1]


def _no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise UsageError(f"{what} contains a NUL character")


def _path(value: Any, base: Path, what: str) -> Path:
    """`value` as an absolute path with symbolic links resolved, relative to `base`."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{what} must be a path (got {_show(value)})")
    _no_nul(value, what)
    try:
        return (base / Path(value).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(f"{what}: {_show(value)} is not a usable path ({exc})") from None


def _model_path(value: str, base: Path) -> str:
    """The model: a path relative to the recipe file if it exists there, else an existing path
    made absolute (as the resolver makes them), else as given (a hub id or alias)."""
    try:
        given = Path(value).expanduser()
    except RuntimeError:  # ~user of an unknown user: not a local path
        given = Path(value)
    for candidate in [given] if given.is_absolute() else [base / given, given]:
        try:
            if candidate.exists():
                return os.path.abspath(candidate)
        except (OSError, ValueError):
            continue
    return value


def _resolve_paths(options: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    """Data files and the like are relative to the recipe file; made absolute here. A data
    option that names nothing there and does not look like a path is a data set id (read
    from the local Hugging Face cache), kept as written."""
    out = dict(options)
    for key in PATH_OPTIONS:
        value = out.get(key)
        if not isinstance(value, str):
            continue
        if key in DATA_OPTIONS and _is_data_id(value, base):
            _no_nul(value, f"{where}: option '{key}'")
            continue
        out[key] = str(_path(value, base, f"{where}: option '{key}'"))
    return out


def _is_data_id(value: str, base: Path) -> bool:
    """Whether a data option names a data set id (`glue`, `org/name`), not a file."""
    if not HUB_ID.fullmatch(value) or is_path_like(value):
        return False
    try:
        return not (base / value).exists() and not Path(value).suffix
    except (OSError, ValueError):
        return False


def _local_model(model: str) -> Path | None:
    """The recipe's model as a resolved local path, or None (a hub id or alias)."""
    path = Path(model)
    try:
        return path.resolve() if path.is_absolute() and path.exists() else None
    except OSError:
        return None


def _check_outputs(recipe: Recipe) -> None:
    """Refuse, before any work, an output that leaves the recipe's directory or that is, lies
    inside or contains what the recipe reads (its model, a data file): `run` replaces it."""
    reads: list[tuple[str, Path]] = []
    model = _local_model(recipe.model)
    if model is not None:
        reads.append(("the recipe's model", model))
    runs = [run for stage in recipe.stages for run in stage.runs()]
    for stage in runs:
        for key in DATA_OPTIONS:
            value = stage.options.get(key)
            if isinstance(value, str) and Path(value).is_absolute():  # not a data set id
                reads.append((f"{stage.label}'s {key} file", Path(value)))
    for stage in runs:
        if not _writes(stage):
            continue
        out = _output_dir(recipe, stage)
        resolved = out.resolve()
        for what, path in reads:
            shown, output = _shown_path(path), _shown_path(out)
            if resolved == path:
                problem = f"output {output} is {what}"
            elif path in resolved.parents:
                problem = f"output {output} lies inside {what} {shown}"
            elif resolved in path.parents:
                problem = f"{what} {shown} lies inside the output {output}, which `run` replaces"
            else:
                continue
            raise UsageError(
                f"{stage.label}: {problem}",
                hint="a recipe never replaces what it reads: choose another workdir or path",
            )


# --- running ---------------------------------------------------------------------------------


class RecipeStageError(MposurgeonError):
    """A stage failed: the message starts with `stage N (name): `, the exit code and hint are
    the original error's, and `report` holds the stages so far, the failed one last."""

    def __init__(self, stage: RecipeStage, cause: Exception, report: RecipeReport) -> None:
        if isinstance(cause, MposurgeonError):
            message, hint, code = str(cause), cause.hint, cause.exit_code
        else:
            first = (str(cause).splitlines() or [""])[0]
            message = f"internal error: {type(cause).__name__}: {first}"
            hint, code = "re-run with --debug for the traceback", 1
        if not message.startswith(f"{stage.label}: "):
            message = f"{stage.label}: {message}"
        super().__init__(message, hint)
        self.exit_code = code
        self.kind = type(cause).__name__
        self.cause = cause
        self.report = report


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
    """Run (or plan) every stage of the recipe at `path`; stop at the first failed gate.

    An error in a stage is raised as `RecipeStageError`, which carries the report so far."""
    recipe = load_recipe(path, workdir)
    if from_stage is not None and from_stage not in [s.name for s in recipe.stages]:
        names = [s.name for s in recipe.stages]
        raise UsageError(
            f"--from {_show(from_stage)}: no such stage{_did_you_mean(from_stage, names)}",
            hint=f"stages: {', '.join(names)}",
        )
    report = RecipeReport(recipe=str(recipe.path), workdir=str(recipe.workdir), stages=[])
    state = _read_state(recipe)
    current = recipe.model
    rerun = force
    base_params: int | None = None
    for stage in recipe.stages:
        rerun = rerun or stage.name == from_stage
        rerun_stage = rerun  # a point that runs makes no other one run: they share the input
        for run in stage.runs():
            out = _output_dir(recipe, run) if _writes(run) else None
            entry = StageReport(
                run.name,
                run.kind,
                "planned",
                current,
                str(out) if out else None,
                point=run.point.id if run.point else None,
                values=dict(run.point.values) if run.point else {},
            )
            report.stages.append(entry)
            try:
                digests = _data_digests(run)
                up_to_date = (
                    out is not None
                    and not rerun_stage
                    and _up_to_date(out, run, current, digests, state.get(_state_key(recipe, out)))
                )
                # A stage that runs makes every later one run: the same plan for a dry run.
                # A swept stage leaves the chain alone: what follows reads its input.
                moves_chain = out is not None and run.point is None
                rerun = rerun or (moves_chain and not up_to_date)
                if dry_run:
                    entry.status = "skipped" if up_to_date else "planned"
                    if moves_chain:
                        current = str(out)
                    continue
                if events:
                    events(run, "start")
                start = time.perf_counter()
                if up_to_date:
                    entry.status = "skipped"
                else:
                    entry.result = _execute(run, current, out, progress)
                    entry.status = "ran"
                    if out is not None:
                        _record_state(recipe, out, digests, time.perf_counter() - start)
                entry.seconds = time.perf_counter() - start
                measured = str(out) if out is not None else current
                if moves_chain:
                    current = str(out)
                if base_params is None:
                    base_params = _total_params(recipe.model)
                entry.metrics = _measure(run, measured, entry.result, base_params)
                entry.gates = _gates(run.expect, entry.metrics)
            except Exception as exc:
                entry.status = "failed"
                if events:
                    events(run, "failed")
                raise RecipeStageError(run, exc, report) from exc
            if events:
                events(run, entry.status)
            if progress:
                progress("recipe", stage.index, len(recipe.stages))
            failed = next((g for g in entry.gates if not g.ok), None)
            if failed is not None:
                report.failed_gate = (run.label, failed)
                entry.status = "failed"
                break
        if report.failed_gate is not None:
            break
    if not dry_run and any(stage.sweep for stage in recipe.stages):
        report.sweep = _write_sweep(recipe, report)
    return report


def _writes(stage: RecipeStage) -> bool:
    """Whether the stage writes an artifact (the next stage reads it), not only reports."""
    return BY_NAME[stage.kind].writes


def _output_dir(recipe: Recipe, stage: RecipeStage) -> Path:
    """`<workdir>/<recipe name>/<NN>-<stage name>` (a sweep point: `.../<point id>`), checked
    to resolve to a directory right there (a symbolic link in its place could send the
    replaced directory anywhere)."""
    root = recipe.workdir / recipe.name
    parts = [f"{stage.index:02d}-{stage.name}", *([stage.point.id] if stage.point else [])]
    out = root.joinpath(*parts)
    resolved = out.resolve()
    if resolved != root.resolve().joinpath(*parts):
        link = next((p for p in (root / parts[0], out) if p.is_symlink()), out)
        raise UsageError(
            f"{stage.label}: output {_shown_path(out)} resolves to {_shown_path(resolved)}, "
            f"outside {_shown_path(root)}",
            hint=f"remove the symbolic link {_shown_path(link)}",
        )
    return out


def _state_key(recipe: Recipe, out: Path) -> str:
    """An output's key in the state file: its path under the recipe's directory
    (`01-decompose`, `02-apet/budget-64.seed-0`)."""
    return out.relative_to(recipe.workdir / recipe.name).as_posix()


def _input_identity(model: str) -> str | None:
    """The manifest sha256 of an artifact input, else None (a checkpoint: compared by path)."""
    path = Path(model)
    return manifest_sha256(path) if (path / MANIFEST_NAME).is_file() else None


def _data_digests(stage: RecipeStage) -> dict[str, str | None]:
    """What every data option of the stage reads, as `data_fingerprint` gives it (None:
    unreadable now)."""
    return {
        key: data_fingerprint(value)
        for key in DATA_OPTIONS
        if isinstance(value := stage.options.get(key), str)
    }


def _up_to_date(
    out: Path,
    stage: RecipeStage,
    current: str,
    digests: dict[str, str | None],
    recorded_state: Any,
) -> bool:
    """The stage's output exists and was made from the same input, with the same options and
    from data files with the same contents (as the runner's state file recorded:
    `recorded_state`, the output's record there)."""
    if (
        not isinstance(recorded_state, dict)
        or None in digests.values()
        or recorded_state.get("data") != digests
    ):
        return False
    try:
        manifest = read_manifest(out)
        if recorded_state.get("manifest_sha256") != manifest_sha256(out):
            return False
    except (ArtifactError, OSError):
        return False
    if manifest.stage != stage.kind:
        return False
    if not _same_options(stage, out, dict(manifest.options)):
        return False
    parent_sha = _input_identity(current)
    if parent_sha is not None:
        return manifest.parent is not None and manifest.parent.manifest_sha256 == parent_sha
    return manifest.parent is None and _same_base(manifest, current)


def _same_options(stage: RecipeStage, out: Path, recorded: dict[str, Any]) -> bool:
    """Whether the options an output's manifest recorded are the stage's. An option the
    record lacks (one a later version added) counts as equal at its default value."""
    cls = options_class(stage.kind)
    expected = cls(**stage.options, output=out).model_dump(mode="json")
    defaults = cls.model_construct().model_dump(mode="json")
    for key in RUNNER_OPTIONS:
        expected.pop(key, None)
        recorded.pop(key, None)
    for key, value in expected.items():
        if key not in recorded and key in defaults and defaults[key] == value:
            recorded[key] = value
    return expected == recorded


def _state_file(recipe: Recipe) -> Path:
    return recipe.workdir / recipe.name / STATE_NAME


def _read_state(recipe: Recipe) -> dict[str, Any]:
    """The runner's records by output directory name; {} when missing or unreadable."""
    try:
        data = json.loads(_state_file(recipe).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def _record_state(
    recipe: Recipe, out: Path, digests: dict[str, str | None], seconds: float
) -> None:
    """Record what `out` was made from (its manifest sha256, the data files' sha256) and the
    seconds it took, written atomically beside the outputs; the artifact itself is left as the
    stage wrote it."""
    stages = _read_state(recipe)
    stages[_state_key(recipe, out)] = {
        "manifest_sha256": manifest_sha256(out),
        "data": digests,
        "seconds": round(seconds, 3),
    }
    text = json.dumps({"format": 1, "stages": stages}, indent=2)
    _write_text(_state_file(recipe), text)


def _write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically: a temporary sibling, fsynced, renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_base(manifest: Manifest, current: str) -> bool:
    from mposurgeon.artifact.resolve import resolve_model

    try:
        resolved = resolve_model(current)
    except Exception:  # noqa: BLE001 - unresolvable now: not up to date
        return False
    return manifest.base.path == str(resolved.path) and manifest.base.revision == resolved.revision


def _execute(
    stage: RecipeStage, current: str, out: Path | None, progress: ProgressCallback | None
) -> Any:
    if stage.kind == INSPECT:
        from mposurgeon.stages.inspect import inspect

        return inspect(current, verify=stage.options.get("verify_checksums", True))
    run = BY_NAME[stage.kind].function()
    if out is None:  # a stage that writes nothing (eval) reads `current` and reports
        return run(current, options_class(stage.kind)(**stage.options), progress=progress)
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
    if not _writes(stage):  # eval: its scores
        return {f"eval_{key}": value for key, value in result.metrics.items()}
    manifest = read_manifest(Path(current))
    # only MPO records carry errors (LoRA, APET, ... records have none)
    errors = [
        m.rel_error for m in manifest.modules.values() if getattr(m, "rel_error", None) is not None
    ]
    predicted = [
        m.predicted_error
        for m in manifest.modules.values()
        if getattr(m, "predicted_error", None) is not None
    ]
    metrics["max_rel_error"] = max(errors) if errors else None
    metrics["max_predicted_error"] = max(predicted) if predicted else None
    from mposurgeon.stages.inspect import inspect

    params = inspect(current, verify=False)["params"]
    metrics["params"] = params["total"]
    # a trained artifact's count: the method's parameters (without the task head), the head's
    trainable, head = params.get("trainable"), params.get("trainable_head")
    if isinstance(trainable, int):
        metrics["trainable_params"] = trainable - (head if isinstance(head, int) else 0)
        metrics["trainable_head"] = head
    metrics["params_ratio"] = params["total"] / base_params if base_params else None
    metrics["mpo_ratio"] = params.get("mpo_ratio")
    recorded = manifest.metrics or {}
    for key in _EVAL_GATES:
        metrics[key] = recorded.get(key)
    verify = recorded.get("verify") or {}
    metrics["merge_diff"] = verify.get("max_abs_diff")
    return metrics


_GATES = {
    "max_rel_error": ("max_rel_error", max),
    "max_predicted_error": ("max_predicted_error", max),
    "max_params_ratio": ("params_ratio", max),
    "max_mpo_ratio": ("mpo_ratio", max),
    "max_merge_diff": ("merge_diff", max),
}
#: The evaluation figures gates read (a train stage's last or best evaluation, an eval
#: stage's scores): `min_eval_accuracy` gates on `eval_accuracy`, and so on.
_EVAL_GATES = tuple(name.split("_", 1)[1] for name in Expectations.model_fields if "_eval_" in name)
_GATES.update(
    {
        name: (name.split("_", 1)[1], min if name.startswith("min_") else max)
        for name in Expectations.model_fields
        if "_eval_" in name
    }
)


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
    label, gate = report.failed_gate
    measured = "not measured" if gate.measured is None else f"{gate.measured:.6g}"
    return VerificationError(
        f"{label}: expect {gate.condition}: {gate.limit:g} failed (measured {measured})",
        hint="the stage's output is kept for inspection; later stages did not run",
    )


# --- sweeps ----------------------------------------------------------------------------------


def _write_sweep(recipe: Recipe, report: RecipeReport) -> SweepReport:
    """Write `sweep.csv` (one row per point of every swept stage) and `sweep.png` into the
    recipe's directory, each atomically, from the points' artifacts and the runner's state;
    the CSV lands even when the plot cannot be drawn (`plot_error` says why)."""
    root = recipe.workdir / recipe.name
    root.mkdir(parents=True, exist_ok=True)
    state = _read_state(recipe)
    done = {
        (entry.name, entry.point): entry
        for entry in report.stages
        if entry.point is not None and entry.status != "planned"
    }
    swept = [stage for stage in recipe.stages if stage.sweep]
    keys = list(dict.fromkeys(key for stage in swept for key in stage.sweep if key != "method"))
    rows: list[dict[str, Any]] = []
    for stage in swept:
        for run in stage.runs():
            assert run.point is not None
            entry = done.get((stage.name, run.point.id))
            row: dict[str, Any] = {
                "stage": stage.name,
                "point": run.point.id,
                "method": _method_of(run),
                **{key: run.point.values.get(key) for key in keys},
            }
            row.update(_point_figures(recipe, entry, state) if entry is not None else {})
            rows.append(row)
    metrics = list(dict.fromkeys(key for row in rows for key in row if key.startswith("eval_")))
    columns = [
        "stage",
        "point",
        "method",
        *keys,
        "trainable_params",
        "trainable_head",
        *metrics,
        "seconds",
        "output",
    ]
    rows = [{column: row.get(column) for column in columns} for row in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_csv_cell(row[column]) for column in columns] for row in rows)
    csv_path = root / SWEEP_CSV
    _write_text(csv_path, buffer.getvalue())

    metric = _main_metric(rows, metrics)
    samples = _samples(swept, rows, metric) if metric is not None else []
    png: Path | None = root / SWEEP_PNG
    plot_error: str | None = None
    lines: list[SweepLine] = []
    if metric is None:
        plot_error = "no point recorded an eval metric (give the swept stages eval_data)"
    elif not samples:
        plot_error = f"no point has both a trainable-parameter count and {metric}"
    else:
        from mposurgeon.plot import plot_sweep, sweep_lines

        lines = sweep_lines(samples)
        title = f"{recipe.name}: {metric} against trainable parameters"
        try:
            plot_sweep(lines, root / SWEEP_PNG, metric=metric, title=title)
        except Exception as exc:  # noqa: BLE001 - the CSV has landed; say why there is no plot
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            hint = getattr(exc, "hint", None)
            plot_error = f"{first} ({hint})" if hint else first
    if plot_error is not None:
        (root / SWEEP_PNG).unlink(missing_ok=True)  # not an older run's plot beside this CSV
        png = None
    return SweepReport(
        csv=str(csv_path),
        png=str(png) if png is not None else None,
        plot_error=plot_error,
        metric=metric,
        columns=columns,
        rows=rows,
        lines=lines,
    )


def _method_of(stage: RecipeStage) -> str:
    """The train stage's `method` (or `mode`), else the stage's kind."""
    for key in ("method", "mode"):
        value = stage.options.get(key)
        if isinstance(value, str):
            return value
    return stage.kind


def _point_figures(recipe: Recipe, entry: StageReport, state: dict[str, Any]) -> dict[str, Any]:
    """A finished point's figures: trainable parameters (without the task head) and the head's,
    the `eval_*` metrics its manifest records, the seconds its run took, its output."""
    if entry.output is None:
        return {}
    out = Path(entry.output)
    figures: dict[str, Any] = {
        "trainable_params": entry.metrics.get("trainable_params"),
        "trainable_head": entry.metrics.get("trainable_head"),
        "output": str(out),
    }
    recorded = read_manifest(out).metrics or {}
    for key, value in recorded.items():
        if not key.startswith("eval_") or key.removeprefix("eval_") in NOT_METRICS:
            continue
        if value is None or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            figures[key] = value
    record = state.get(_state_key(recipe, out))
    seconds = record.get("seconds") if isinstance(record, dict) else None
    figures["seconds"] = seconds if isinstance(seconds, (int, float)) else None
    return figures


def _csv_cell(value: Any) -> str:
    """A CSV cell: empty for None, text as written, anything else as JSON (`true`, `0.5`)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _main_metric(rows: list[dict[str, Any]], metrics: list[str]) -> str | None:
    """`eval_accuracy` when some point has it, else the first `eval_*` metric some point has."""
    present = [m for m in metrics if any(isinstance(row.get(m), (int, float)) for row in rows)]
    if "eval_accuracy" in present:
        return "eval_accuracy"
    return present[0] if present else None


def _samples(
    stages: list[RecipeStage], rows: list[dict[str, Any]], metric: str
) -> list[SweepSample]:
    """The plot's points: one per row with a positive trainable count and the metric; a line
    per stage (per stage and method when a stage sweeps the method), the setting its swept
    values other than the seeds."""
    samples = []
    for stage in stages:
        mine = [row for row in rows if row["stage"] == stage.name]
        methods = {row["method"] for row in mine}
        for row, point in zip(mine, stage.points, strict=True):
            x, y = row.get("trainable_params"), row.get(metric)
            if not isinstance(x, int) or x <= 0 or not isinstance(y, (int, float)):
                continue
            label = stage.name if len(methods) == 1 else f"{stage.name} ({row['method']})"
            setting = json.dumps(
                {k: v for k, v in point.values.items() if k not in SEED_OPTIONS}, sort_keys=True
            )
            samples.append(SweepSample(line=label, setting=setting, x=x, y=float(y)))
    return samples
