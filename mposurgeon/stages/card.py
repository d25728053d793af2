"""The model card (`README.md`) every stage writes, through `huggingface_hub.ModelCard`.

Its YAML metadata says what the Hub needs to list the output: `base_model` (the hub id it
descends from; never a local path), `license` (the base card's, else a LICENSE file's when its
text is plain), `library_name` (`mposurgeon` for an artifact, which needs mposurgeon to load;
`transformers`, or `sentence-transformers` with a `modules.json`, for a merged checkpoint),
`tags` (mposurgeon, mpo, the methods of the lineage, the stage), `pipeline_tag` (from the
model's head, else the base's), `datasets` (hub data sets trained on) and `model-index` (the
eval metrics, when the eval data set has a hub id).

Its body: how the output was made (the lineage: stage, options that differ from the stage's
defaults, time), parameter counts, the eval metrics as a table, how to load it, and the base
checkpoint's own card below "## Base model card", as it came (its YAML folded into ours). An
artifact's card carries that section on, so every descendant keeps the base's card and license.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from pydantic_core import to_jsonable_python

from mposurgeon._version import __version__
from mposurgeon.artifact.manifest import BaseInfo, Manifest, MetricsRecord
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import ArtifactError
from mposurgeon.methods.registry import method_names

CARD_NAME = "README.md"
#: The file that makes a checkpoint a sentence-transformers model.
ST_MODULES_FILE = "modules.json"
#: The heading the base checkpoint's own card is kept under, and the line that introduces it.
BASE_CARD_HEADING = "## Base model card"
_BASE_CARD_INTRO = "The card that came with the base checkpoint"

#: Options never shown in the lineage table: where and how the output was written.
_HOUSEKEEPING = {
    "output",
    "workdir",
    "overwrite",
    "verify_checksums",
    "max_shard_size",
    "cache_dir",
    "offline",
    "revision",
    "dry_run",
    "resume",
}

#: The model head (end of the `architectures` class name) -> the Hub's pipeline tag.
_HEAD_PIPELINES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
)

#: A train task -> the Hub's task type of its eval results.
_TASK_TYPES = {
    "classification": "text-classification",
    "regression": "text-classification",
    "causal-lm": "text-generation",
    "seq2seq": "text2text-generation",
}

#: Eval figures (keys of a train eval record) -> the Hub's metric type, and a readable name.
_METRIC_TYPES = {
    "accuracy": ("accuracy", "accuracy"),
    "macro_f1": ("f1", "macro F1"),
    "mcc": ("matthews_correlation", "Matthews correlation"),
    "pearson": ("pearsonr", "Pearson r"),
    "spearman": ("spearmanr", "Spearman rho"),
    "perplexity": ("perplexity", "perplexity"),
    "exact_match": ("exact_match", "exact match"),
    "loss": ("loss", "loss"),
}

#: Plain license texts, recognized by a phrase of their first lines (case-insensitive), in
#: the order tried (the more specific first) -> the Hub's license id.
_LICENSE_TEXTS = (
    ("apache license", "apache-2.0"),  # with "version 2.0", checked below
    ("mit license", "mit"),
    ("permission is hereby granted, free of charge", "mit"),
    ("bsd 3-clause", "bsd-3-clause"),
    ("bsd 2-clause", "bsd-2-clause"),
    ("gnu lesser general public license", "lgpl"),
    ("gnu affero general public license", "agpl"),
    ("gnu general public license", "gpl"),
    ("mozilla public license version 2.0", "mpl-2.0"),
    ("attribution-noncommercial-sharealike 4.0", "cc-by-nc-sa-4.0"),
    ("attribution-noncommercial 4.0", "cc-by-nc-4.0"),
    ("attribution-sharealike 4.0", "cc-by-sa-4.0"),
    ("attribution 4.0 international", "cc-by-4.0"),
    ("llama 2 community license", "llama2"),
    ("llama 3 community license", "llama3"),
    ("llama 3.1 community license", "llama3.1"),
    ("llama 3.2 community license", "llama3.2"),
    ("gemma terms of use", "gemma"),
    ("bigscience rail license v1.0", "bigscience-bloom-rail-1.0"),
)
_LICENSE_FILE = re.compile(r"^(licen[cs]e|copying)([-_. ].*)?$", re.IGNORECASE)
_LICENSE_HEAD_BYTES = 2048


@dataclass(frozen=True)
class BaseCard:
    """What an output's card takes from the card of its base checkpoint: license fields,
    language, pipeline tag, and the Markdown body (without YAML; "" when there was no card)."""

    license: str | None = None
    language: str | list[str] | None = None
    license_name: str | None = None
    license_link: str | None = None
    pipeline_tag: str | None = None
    body: str = ""


def write_model_card(
    directory: Path,
    manifest: Manifest,
    *,
    source: Path,
    parent: Manifest | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Write `directory/README.md` for the output `manifest` describes, whose files are in
    `directory` (tensor files and config written, base files copied); `source` is the input
    it was made from (an artifact when `parent`, its manifest, is given), `repo_id` the Hub
    repository it is about to be pushed to. Returns the card."""
    card = model_card(directory, manifest, source=source, parent=parent, repo_id=repo_id)
    card.save(directory / CARD_NAME)
    return card


def model_card(
    directory: Path,
    manifest: Manifest,
    *,
    source: Path,
    parent: Manifest | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of the output in `directory` (see `write_model_card`)."""
    base_card = read_base_card(source, from_artifact=parent is not None)
    license_id = base_card.license or license_from_files([directory, source])
    dense = manifest.stage == "merge"
    sentence_transformers = dense and (directory / ST_MODULES_FILE).is_file()
    library = (
        ("sentence-transformers" if sentence_transformers else "transformers")
        if dense
        else "mposurgeon"
    )
    config = _read_config(directory)
    title = f"{manifest.base.name} ({manifest.stage})"
    metrics, measured_by = _eval_metrics(manifest, parent)
    eval_results = _eval_results(metrics)
    data = ModelCardData(
        base_model=base_hub_id(manifest.base),
        language=base_card.language,
        license=license_id,
        license_name=base_card.license_name if license_id == base_card.license else None,
        license_link=base_card.license_link if license_id == base_card.license else None,
        library_name=library,
        pipeline_tag=_head_pipeline(config) or base_card.pipeline_tag,
        tags=card_tags(manifest, parent, library),
        datasets=_hub_datasets(metrics) or None,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
    )
    sections = [
        f"# {title}",
        _made_section(manifest),
        _params_section(directory, manifest),
        _eval_section(metrics, measured_by),
        _load_section(manifest, config, repo_id, sentence_transformers),
        _base_section(manifest.base, base_card.body),
    ]
    body = "\n\n".join(s.strip("\n") for s in sections if s) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# -- metadata --------------------------------------------------------------------------------


def base_hub_id(base: BaseInfo) -> str | None:
    """The hub id of the base checkpoint: its recorded id, else the one a Hugging Face cache
    snapshot path names (`.../models--org--name/snapshots/<sha>`); None for a local model."""
    if base.model_id:
        return base.model_id
    parts = Path(base.path).parts
    for folder, child in zip(parts, parts[1:], strict=False):
        if folder.startswith("models--") and child == "snapshots":
            return "/".join(folder.removeprefix("models--").split("--")) or None
    return None


def card_tags(manifest: Manifest, parent: Manifest | None, library: str) -> list[str]:
    """mposurgeon, mpo, the methods of the lineage (train's `method`, the methods that own the
    output's and its input's modules), the stage (`mposurgeon-merge`: a bare `merge` tag
    means a mergekit merge on the Hub), and the library for a dense checkpoint."""
    known = set(method_names())
    methods: list[str] = []
    for entry in manifest.lineage:
        method = entry.options.get("method")
        if isinstance(method, str) and method in known:
            methods.append(method)
    for owner in (parent, manifest):
        if owner is not None:
            methods += [rec.method for rec in owner.modules.values()]
    tags = ["mposurgeon", "mpo", *methods, f"mposurgeon-{manifest.stage}"]
    if library != "mposurgeon":
        tags.append(library)
    return list(dict.fromkeys(tags))


def read_base_card(source: Path, *, from_artifact: bool) -> BaseCard:
    """The base card as the input `source` holds it: a checkpoint's `README.md` is the base's
    card; an artifact's (written here) carries it below `BASE_CARD_HEADING`, with the license
    in its own metadata. A missing or unreadable card gives an empty `BaseCard`."""
    try:
        text = (Path(source) / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return BaseCard()
    meta, body = _split_card(text)
    if from_artifact:
        body = _kept_base_body(body)
    language = meta.get("language")
    return BaseCard(
        license=_text(meta.get("license")),
        language=language if isinstance(language, (str, list)) and language else None,
        license_name=_text(meta.get("license_name")),
        license_link=_text(meta.get("license_link")),
        pipeline_tag=_text(meta.get("pipeline_tag")),
        body=body.strip("\n"),
    )


def license_from_files(directories: Iterable[Path]) -> str | None:
    """The Hub license id of the LICENSE (LICENCE, COPYING) files at the top of the first of
    `directories` that has any, when their text says it plainly (Apache 2.0, MIT, BSD, GPL,
    CC, Llama...); None when there is none, or the files disagree or are not recognized."""
    for directory in directories:
        try:
            files = sorted(p for p in Path(directory).iterdir() if _LICENSE_FILE.match(p.name))
        except OSError:
            continue
        files = [p for p in files if p.is_file()]
        if not files:
            continue
        found = {_license_of_text(_head(p)) for p in files}
        return found.pop() if len(found) == 1 else None
    return None


def _license_of_text(head: str) -> str | None:
    """The license id of a license text from its first lines, or None."""
    text = " ".join(head.lower().split())
    for phrase, license_id in _LICENSE_TEXTS:
        if phrase not in text:
            continue
        if license_id == "apache-2.0":
            return license_id if "version 2.0" in text else None
        if license_id in ("gpl", "lgpl", "agpl"):
            version = re.search(r"version ([23])", text)
            return f"{license_id}-{version.group(1)}.0" if version else None
        return license_id
    return None


def _head(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            return file.read(_LICENSE_HEAD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _split_card(text: str) -> tuple[dict[str, Any], str]:
    """A card's YAML metadata (`{}` if none or not a mapping) and its Markdown body."""
    if not text.lstrip().startswith("---"):
        return {}, text
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError):  # metadata that is no mapping, or no YAML at all
        match = re.match(r"\s*---\r?\n.*?\r?\n---[ \t]*(?:\r?\n|$)", text, re.DOTALL)
        return {}, text[match.end() :] if match else text
    return card.data.to_dict(), card.text


def _kept_base_body(body: str) -> str:
    """The base card an artifact's card keeps below `BASE_CARD_HEADING`, without the line
    that introduces it; "" when it keeps none."""
    lines = body.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip() == BASE_CARD_HEADING:
            rest = lines[i + 1 :]
            while rest and not rest[0].strip():
                rest = rest[1:]
            if rest and rest[0].startswith(_BASE_CARD_INTRO):
                rest = rest[1:]
            return "".join(rest)
    return ""


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _architecture(config: Mapping[str, Any]) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def _head_pipeline(config: Mapping[str, Any]) -> str | None:
    """The pipeline tag the model's head says (a *ForSequenceClassification classifies)."""
    arch = _architecture(config) or ""
    return next((tag for end, tag in _HEAD_PIPELINES if arch.endswith(end)), None)


# -- metrics ---------------------------------------------------------------------------------


def _eval_metrics(
    manifest: Manifest, parent: Manifest | None
) -> tuple[MetricsRecord | None, str | None]:
    """The train metrics with evaluations that describe this output: its own, else its
    input's (a merge of a trained artifact has the same figures); and the stage they are
    from when that is the input's."""
    if _evaluations(manifest.metrics):
        return manifest.metrics, None
    if parent is not None and _evaluations(parent.metrics):
        return parent.metrics, parent.stage
    return manifest.metrics, None


def _evaluations(metrics: MetricsRecord | None) -> dict[str, Any]:
    """The figures of the evaluation the metrics stand for (the kept best one, else the
    last), without step and rows: {"accuracy": 0.9, "loss": 0.3, ...}; {} without one."""
    if not metrics:
        return {}
    evals = [e for e in metrics.get("eval") or [] if isinstance(e, dict)]
    best = metrics.get("best_step")
    chosen = next((e for e in evals if e.get("step") == best), None) if best is not None else None
    chosen = chosen or (evals[-1] if evals else None)
    if chosen is None:  # older artifacts: the top-level figures only
        chosen = {
            key.removeprefix("eval_"): value
            for key, value in metrics.items()
            if key.startswith("eval_") and key != "eval_rows"
        }
    return {
        key: value
        for key, value in chosen.items()
        if key not in ("step", "rows") and isinstance(value, (int, float))
    }


def _data_record(metrics: MetricsRecord | None, which: str) -> dict[str, Any]:
    data = (metrics or {}).get("data")
    record = data.get(which) if isinstance(data, dict) else None
    return record if isinstance(record, dict) else {}


def _hub_datasets(metrics: MetricsRecord | None) -> list[str]:
    """The hub ids of the data sets trained and evaluated on (local files have none)."""
    ids = [_data_record(metrics, which).get("id") for which in ("train", "eval")]
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and i))


def _eval_results(metrics: MetricsRecord | None) -> list[EvalResult]:
    """The eval figures as `model-index` results, when the eval data set has a hub id."""
    figures = _evaluations(metrics)
    record = _data_record(metrics, "eval")
    dataset = record.get("id")
    if not figures or not isinstance(dataset, str) or metrics is None:
        return []
    task = _TASK_TYPES.get(str(metrics.get("task") or "classification"), "text-classification")
    results = []
    for key, value in figures.items():
        metric_type, metric_name = _METRIC_TYPES.get(key, (key, key))
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_config=_text(record.get("config")),
                dataset_split=_text(record.get("split")),
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=value,
            )
        )
    return results


# -- body ------------------------------------------------------------------------------------


def _made_section(manifest: Manifest) -> str:
    base = manifest.base
    revision = f" at revision `{base.revision}`" if base.revision else ""
    lines = [
        "## How it was made",
        "",
        f"Made with mposurgeon {__version__} from `{base.model_id or base.path}`{revision}, "
        "stage by stage (options that differ from the stage's defaults):",
        "",
        "| # | stage | options | time (UTC) |",
        "| --- | --- | --- | --- |",
    ]
    for i, entry in enumerate(manifest.lineage, 1):
        shown = shown_options(entry.stage, entry.options)
        options = ", ".join(f"{k}={_option_text(v)}" for k, v in shown.items()) or "-"
        lines.append(f"| {i} | `{entry.stage}` | {_cell(options)} | {_cell(entry.created_at)} |")
    verify = (manifest.metrics or {}).get("verify")
    if verify and verify.get("ok") and verify.get("max_abs_diff") is not None:
        lines += [
            "",
            f"Verified: on a sample input its outputs match the model it was made from within "
            f"{verify['max_abs_diff']:.2e} (tolerance {verify.get('tolerance') or 0:.1e}).",
        ]
    return "\n".join(lines)


def shown_options(stage: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a lineage entry worth showing: set (not None, False or empty), not
    about where the output went, and different from the stage's default."""
    defaults = _stage_defaults(stage)
    return {
        key: value
        for key, value in options.items()
        if key not in _HOUSEKEEPING
        and value not in (None, False, [], {}, "")
        and (key not in defaults or defaults[key] != value)
    }


def _stage_defaults(stage: str) -> dict[str, Any]:
    """The JSON form of the default of every option of `stage` that has one ({} for a stage
    that is not registered, e.g. `prepare`)."""
    from mposurgeon.stages.registry import STAGES

    entry = next((s for s in STAGES if s.name == stage and s.options is not None), None)
    if entry is None:
        return {}
    out: dict[str, Any] = {}
    for name, field in entry.options_class().model_fields.items():
        if not field.is_required():
            out[name] = to_jsonable_python(field.get_default(call_default_factory=True))
    return out


def _option_text(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _cell(text: str) -> str:
    """`text` safe in a Markdown table cell (one line, no column breaks)."""
    return " ".join(text.split()).replace("|", "\\|")


def _params_section(directory: Path, manifest: Manifest) -> str:
    """The parameters the tensor files hold, and per method its matrices' parameters in
    place of the dense ones."""
    try:
        with open_tensors(directory) as reader:
            stored = sum(_numel(reader.shape(key)) for key in reader.keys())
    except ArtifactError:
        stored = None
    lines = ["## Parameters", ""]
    if stored is not None:
        kind = "a dense checkpoint" if manifest.stage == "merge" else "its tensor files"
        lines.append(f"{stored:,} parameters in {kind}.")
    by_method: dict[str, list[Any]] = {}
    for rec in manifest.modules.values():
        by_method.setdefault(rec.method, []).append(rec)
    if by_method:
        lines += [
            "",
            "| method | matrices | parameters | dense parameters of those matrices |",
            "| --- | --- | --- | --- |",
        ]
        for method, records in sorted(by_method.items()):
            params = sum(r.params for r in records)
            dense = sum(r.dense_params for r in records)
            lines.append(f"| {method} | {len(records)} | {params:,} | {dense:,} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _eval_section(metrics: MetricsRecord | None, measured_by: str | None) -> str:
    """How it was trained and what it scored, as a table (the `model-index` holds the same
    figures when the eval data set is on the Hub)."""
    if not metrics or metrics.get("method") is None:
        return ""
    steps, epochs = metrics.get("steps"), metrics.get("epochs")
    final = metrics.get("final_loss")
    lines = [
        "## Training and evaluation",
        "",
        f"Trained with method `{metrics.get('method')}`"
        + (f" for the task {metrics['task']}" if metrics.get("task") else "")
        + (f", {steps} steps ({epochs:g} epochs)" if steps is not None and epochs else "")
        + (f", final loss {final:.4f}" if isinstance(final, float) else "")
        + (f" (figures of the {measured_by} output this was made from)" if measured_by else "")
        + ".",
    ]
    trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
    if trainable is not None and total:
        lines.append(f"Trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}).")
    figures = _evaluations(metrics)
    if figures:
        record = _data_record(metrics, "eval")
        data = record.get("id") or Path(str(record.get("path") or "")).name or "the eval data"
        rows = metrics.get("eval_rows")
        step = metrics.get("best_step")
        where = f" (the kept best evaluation, step {step})" if step is not None else ""
        lines += [
            "",
            f"Evaluation on `{data}`" + (f" ({rows} rows)" if rows else "") + f"{where}:",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        for key, value in figures.items():
            name = _METRIC_TYPES.get(key, (key, key))[1]
            lines.append(f"| {_cell(name)} | {value:.4g} |")
    return "\n".join(lines)


def _load_section(
    manifest: Manifest, config: Mapping[str, Any], repo_id: str | None, sentence: bool
) -> str:
    """How to load the output: `mposurgeon.load_model` for an artifact (transformers alone
    would load it wrong), `from_pretrained` (or sentence-transformers) for a merged one."""
    where = repo_id or "path/to/this/folder"
    if manifest.stage == "merge":
        arch = _architecture(config) or "AutoModel"
        lines = [
            "## How to load it",
            "",
            "A plain `transformers` checkpoint:",
            "",
            "```python",
            f"from transformers import {arch}",
            "",
            f'model = {arch}.from_pretrained("{where}")',
            "```",
        ]
        if sentence:
            lines += [
                "",
                "or, with its sentence-transformers modules (pooling, normalization):",
                "",
                "```python",
                "from sentence_transformers import SentenceTransformer",
                "",
                f'model = SentenceTransformer("{where}")',
                "```",
            ]
        return "\n".join(lines)
    fetch = (
        ["from huggingface_hub import snapshot_download", "import mposurgeon", ""]
        if repo_id
        else ["import mposurgeon", ""]
    )
    path = f'snapshot_download("{repo_id}")' if repo_id else f'"{where}"'
    return "\n".join(
        [
            "## How to load it",
            "",
            "An mposurgeon artifact (`mposurgeon.json` records its methods' modules): "
            "`from_pretrained` alone does not build their layers. Load it with mposurgeon:",
            "",
            "```python",
            *fetch,
            f"model = mposurgeon.load_model({path})",
            "```",
            "",
            "or merge it into a plain checkpoint: `mposurgeon merge DIR -o DENSE_DIR --verify`.",
        ]
    )


def _base_section(base: BaseInfo, body: str) -> str:
    if not body.strip():
        return ""
    name = base.model_id or base.name
    return (
        f"{BASE_CARD_HEADING}\n\n{_BASE_CARD_INTRO} (`{name}`), as it was; "
        f"its metadata is folded into the metadata above.\n\n{body}"
    )
