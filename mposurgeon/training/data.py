"""Text data for `train`, `eval` and `select --method fisher`: local files, saved data sets,
and data set ids from the local Hugging Face cache.

What `read_dataset(spec, config=, split=, columns=)` reads:

- a JSON Lines (`.jsonl`, `.ndjson`, `.json`), JSON array (`.json` starting with `[`), CSV
  (`.csv`) or TSV (`.tsv`) file: read here, strictly, every problem named by file and line;
- a Parquet (`.parquet`) or Arrow (`.arrow`) file: read with the `datasets` library;
- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (a split of it
  with `split`), or any other directory `datasets.load_dataset` reads (data files named by
  split, or a dataset repository whose README declares `configs:`);
- a data set id (`glue`, `org/name`) with its `config`: resolved from the local Hugging Face
  cache only, never the network: first the hub cache (HF_HUB_CACHE: what `hf download ...
  --repo-type dataset` or an online `datasets.load_dataset` left there; `datasets` itself would
  look only at its own cache when offline), then the `datasets` cache (HF_DATASETS_CACHE: Arrow
  files an earlier `load_dataset` prepared). A miss is one error saying how to fetch it.

Why two readers: the `datasets` JSON reader (pyarrow) reports a bad object on line 2 as "row 1"
(the row within a block), its CSV reader (pandas) a quoted field opened on line 4 as "row 3"
(blank lines are not counted), and both fill a column that some rows lack with None and unify
the types of a column, so a row without a label or with a number among strings is no longer
visible. The line-numbered strict readers stay for the text formats; `datasets` reads what it
adds: columnar files, saved data sets, configurations and splits, the cache. Rows read through
`datasets` are named by row number (1-based) in errors.

Columns and tasks (`Columns`): classification and regression read a text (`text`, else
`text_a` with an optional `text_b` as the second text of a pair) and a `label`; causal-lm reads
`text` (every token) or `prompt` and `completion`; seq2seq reads `source` and `target`; other
names with `--text-column`, `--text-pair-column`, `--label-column`, `--target-column`. Without
`--task`, data with a label column is classification, or regression when a label is a number
with a fraction ("float labels mean regression"); data without one is read for the model's
generative task. Class labels are integers or strings (a float without fraction is an
integer), mapped to ids 0..K-1 in sorted order (integers numerically), the names kept for
`id2label`; a `ClassLabel` column (integers with names) gives its names, in its order, for the
classes that occur. Regression labels are numbers (in CSV: decimal text), read as floats.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, Field, field_validator

from mposurgeon.artifact.resolve import HUB_ID, is_path_like
from mposurgeon.artifact.store import sha256_file
from mposurgeon.errors import DataError, ModelNotFoundError, UsageError

if TYPE_CHECKING:
    import datasets

#: Default (text, pair) column names, tried in order.
TEXT_COLUMNS = (("text", None), ("text_a", "text_b"))
#: Formats read here (line-numbered errors), by suffix.
STRICT_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
}
#: Formats read with `datasets` (its packaged builder), by suffix.
DATASETS_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
#: The split read from a DatasetDict or a data set id when none is named.
DEFAULT_SPLIT = "train"
#: The split of eval data read from a DatasetDict or a data set id when none is named.
DEFAULT_EVAL_SPLIT = "validation"
_FORMATS_HINT = "use .jsonl, .json, .csv, .tsv, .parquet or .arrow files, or a saved data set"


#: The tasks data can be read for; None: inferred (see `Columns.roles`).
TaskName = Literal["classification", "regression", "causal-lm", "seq2seq"]
TASKS: tuple[str, ...] = get_args(TaskName)
#: Default (input, target) columns of the generative tasks, tried in order; causal-lm also
#: reads a lone `text` column (loss on every token).
GENERATIVE_COLUMNS = (("prompt", "completion"), ("source", "target"))


@dataclass(frozen=True)
class Roles:
    """The columns read, one per role (None: not read), and the task they are read for (None:
    classification or regression, decided by the label values)."""

    task: str | None
    text: str
    text_pair: str | None = None
    label: str | None = None
    target: str | None = None
    pair_optional: bool = False  # the default pair column: a row without it is a single text


@dataclass(frozen=True)
class Columns:
    """Which columns hold each role (None: the task's defaults), and the task to read for.

    Roles: `text`, the input (classification and regression: `text`, else `text_a`; causal-lm:
    `prompt`, else `source`, else `text`; seq2seq: `source`, else `prompt`); `text_pair`, the
    second text of a pair (`text_b` beside `text_a`); `label` (`label`); `target`, the text to
    produce (`completion` beside `prompt`, `target` beside `source`).

    `task` None infers it (`roles`): data with a label column is classification, or
    regression when some label is a number with a fraction; data without one is read for
    `generative` (the model's generative task: causal-lm or seq2seq), else an error naming the
    missing label column.
    """

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    target: str | None = None
    task: str | None = None
    generative: str | None = None

    @property
    def label_name(self) -> str:
        return self.label or "label"

    def text_names(self, present: Collection[str]) -> tuple[str, str | None] | None:
        """The (text, pair) columns to read among `present`: the ones named, else the first
        default text column present; None when no default is present."""
        if self.text is not None:
            return self.text, self.text_pair
        for first, second in TEXT_COLUMNS:
            if first in present:
                return first, self.text_pair or second
        return None

    def roles(self, name: str, present: Collection[str]) -> Roles:
        """The columns of data set `name` (its columns: `present`) to read for the task, each
        checked to be present; a clear error naming the flag to fix otherwise."""
        task = self.task
        if task is None:
            labelled = self.label is not None or self.label_name in present
            task = None if labelled or self.generative is None else self.generative
        if task in (None, "classification", "regression"):
            return self._labelled_roles(name, present, task)
        return self._generative_roles(name, present, task)

    def _labelled_roles(self, name: str, present: Collection[str], task: str | None) -> Roles:
        names = self.text_names(present)
        if names is None:
            raise DataError(
                f"{name}: no text column 'text' (or 'text_a' and 'text_b'); columns: "
                f"{', '.join(present) or 'none'}",
                hint="name the text column with --text-column",
            )
        first, second = names
        if second is not None and second not in present and self.text_pair is None:
            second = None  # text_a without text_b: single texts
        label = self.label_name
        _check_present(name, present, first, "--text-column")
        _check_present(name, present, second, "--text-pair-column")
        if label not in present:
            generative = (
                ""
                if self.task
                else (
                    "; data without labels trains a causal-LM (GPT-2, Llama, BLOOM) or seq2seq "
                    "(T5, BART) model"
                )
            )
            raise DataError(
                f"{name}: no label column {label!r} (columns: {', '.join(present)}){generative}",
                hint="name it with --label-column",
            )
        return Roles(task, first, second, label, pair_optional=self.text_pair is None)

    def _generative_roles(self, name: str, present: Collection[str], task: str) -> Roles:
        pairs = list(GENERATIVE_COLUMNS)
        if task == "seq2seq":
            pairs.reverse()  # source/target first
        text, target = self.text, self.target
        if text is None or target is None:
            for first, second in pairs:
                if (text or first) in present and (target or second) in present:
                    text, target = text or first, target or second
                    break
        if task == "causal-lm" and target is None and text is None and "text" in present:
            text = "text"  # plain text: loss on every token
        if text is None:
            wanted = "'prompt' and 'completion', 'source' and 'target'"
            if task == "causal-lm":
                wanted = "'text', or " + wanted
            raise DataError(
                f"{name}: {task} data needs the columns {wanted} (columns: "
                f"{', '.join(present) or 'none'})",
                hint="name them with --text-column and --target-column",
            )
        if task == "seq2seq" and target is None:
            raise DataError(
                f"{name}: seq2seq data needs a target column beside {text!r} (columns: "
                f"{', '.join(present)})",
                hint="name it with --target-column",
            )
        _check_present(name, present, text, "--text-column")
        _check_present(name, present, target, "--target-column")
        return Roles(task, text, target=target)


def _check_present(name: str, present: Collection[str], column: str | None, flag: str) -> None:
    if column is not None and column not in present:
        raise DataError(
            f"{name}: no column {column!r} (columns: {', '.join(present) or 'none'})",
            hint=f"name it with {flag}",
        )


class DataOptions(BaseModel):
    """Which data set and which of its columns (the data flags of `train`; `split` None: the
    `train` split of a DatasetDict or data set id)."""

    data: str = Field(
        description="a data file, a saved data set directory, or a data set id (offline cache)"
    )
    data_config: str | None = Field(None, description="configuration of a data set id")
    split: str | None = Field(None, description="split of a DatasetDict or data set id")
    text_column: str | None = Field(
        None, description="the input text (default: text, text_a, prompt or source)"
    )
    text_pair_column: str | None = Field(None, description="default: text_b beside text_a")
    label_column: str | None = Field(None, description="default: label")
    target_column: str | None = Field(
        None, description="the text to produce (default: completion or target)"
    )

    @field_validator("data", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def columns(self, task: str | None = None, generative: str | None = None) -> Columns:
        """The columns to read for `task` (None: inferred; see `Columns`)."""
        return Columns(
            self.text_column,
            self.text_pair_column,
            self.label_column,
            self.target_column,
            task=task,
            generative=generative,
        )

    def read_data(
        self, hub_cache: Path | None = None, columns: Columns | None = None
    ) -> TextDataset:
        """The data set `data` names (`hub_cache`: where data set ids are looked up), read
        with `columns` (default: `self.columns()`, the task inferred)."""
        return read_dataset(
            self.data,
            config=self.data_config,
            split=self.split,
            columns=columns or self.columns(),
            hub_cache=hub_cache,
        )


@dataclass(frozen=True)
class DataSource:
    """Where rows were read from, for messages (`name`, `unit`) and the manifest (`record`).

    `kind`: file (a local file), saved (a `save_to_disk` directory), directory (another
    directory `datasets` reads), hub (a snapshot in the hub cache), cache (Arrow files in the
    `datasets` cache). `location` is an absolute path, or the data set id for hub and cache.
    `files` maps the local files read to their sha256; `revision` is the hub snapshot's commit
    (hub) or `<version>/<hash>` of the prepared cache (cache); `fingerprint` is the fingerprint
    `datasets` gives the split."""

    kind: Literal["file", "saved", "directory", "hub", "cache"]
    location: str
    name: str
    unit: str = "line"
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    fingerprint: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The manifest's record: `path` and `sha256` of a file; `path` (or `id`), `config`,
        `split`, `revision`, `fingerprint` and `files` ({path: sha256}) of a data set."""
        out: dict[str, Any] = {"id" if self.kind in ("hub", "cache") else "path": self.location}
        if self.kind == "file":
            out["sha256"] = next(iter(self.files.values()))
            return out
        out["source"] = self.kind
        for key in ("config", "split", "revision", "fingerprint"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.files:
            out["files"] = dict(self.files)
        return out


@dataclass(frozen=True)
class Example:
    """One row: the input text, the second text of a pair, the label (an integer or string
    class, or a float for regression; None for the generative tasks), the text to produce
    (causal-lm completion, seq2seq target; None for plain causal-lm text and the labelled
    tasks), and its line in the file (row number, 1-based, for data read through `datasets`)."""

    text: str
    text_pair: str | None
    label: int | str | float | None
    line: int
    target: str | None = None


@dataclass
class TextDataset:
    """Rows of one data set, the task they were read for, and for classification the label
    mapping (`labels[i]` is the name of label id i; empty for the other tasks). `path` is the
    file or directory read (the snapshot or cache directory of a data set id)."""

    path: Path
    examples: list[Example]
    labels: list[str]
    source: DataSource | None = None
    task: str = "classification"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def name(self) -> str:
        """The data set as messages name it: the file name, or `id (config, split)`."""
        return self.source.name if self.source is not None else self.path.name

    @property
    def unit(self) -> str:
        """What `Example.line` counts: "line" (of a text file) or "row"."""
        return self.source.unit if self.source is not None else "line"

    def record(self) -> dict[str, Any]:
        """What was read, for the manifest (`DataSource.record`)."""
        if self.source is not None:
            return self.source.record()
        return {"path": str(self.path.resolve()), "sha256": sha256_file(self.path)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def label_ids(self) -> list[int]:
        """The label id of every example (classification)."""
        mapping = self.label2id
        out = []
        for ex in self.examples:
            name = str(ex.label)
            if name not in mapping:
                raise DataError(
                    f"{self.name} {self.unit} {ex.line}: label {ex.label!r} is not one of the "
                    f"training labels ({', '.join(self.labels)})"
                )
            out.append(mapping[name])
        return out

    def label_values(self) -> list[float]:
        """The label of every example as a float (regression)."""
        return [float(ex.label) for ex in self.examples]  # type: ignore[arg-type]

    def with_labels(self, labels: Sequence[str]) -> TextDataset:
        """The same rows mapped with another label list (eval data uses the training labels)."""
        dataset = TextDataset(self.path, self.examples, list(labels), self.source, self.task)
        dataset.label_ids()  # fail early, naming the line, on an unknown label
        return dataset


def data_fingerprint(spec: str | Path) -> str | None:
    """What `spec` reads, as one string that changes when the data does (recipes rerun a
    stage whose data changed): a file's sha256; a directory's sha256 over its files' relative
    paths and sha256; a data set id with the commit of its hub cache snapshot (`glue@<sha>`),
    or the id alone when only the `datasets` cache holds it. None when it cannot be read."""
    path = Path(spec)
    try:
        if path.is_file():
            return sha256_file(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            listing = [[str(p.relative_to(path)), sha256_file(p)] for p in files]
            return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    except OSError:
        return None
    text = os.fspath(spec)
    if not HUB_ID.fullmatch(text):
        return None
    snapshot = _hub_snapshot(text, None)
    return f"{text}@{snapshot.name}" if snapshot is not None else text


def read_dataset(
    spec: str | Path,
    *,
    config: str | None = None,
    split: str | None = None,
    columns: Columns | None = None,
    default_split: str = DEFAULT_SPLIT,
    hub_cache: Path | None = None,
) -> TextDataset:
    """Read labelled text from a file, a data set directory, or a cached data set id.

    `config` names the configuration of a data set id or dataset repository directory, `split`
    the split of a DatasetDict or id (`default_split` when None); neither applies to a file.
    `hub_cache` is the hub cache to look ids up in (default HF_HUB_CACHE). Nothing is
    downloaded.
    """
    columns = columns or Columns()
    text = os.fspath(spec)
    if not text.strip():
        raise UsageError("--data is empty", hint="pass a data file, directory or data set id")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user of an unknown user
        path = Path(text)
    if path.is_file():
        if config is not None or split is not None:
            raise UsageError(
                f"{path.name} is one file: --data-config and --split choose a configuration or "
                "split of a data set id or data set directory",
                hint="leave them out for a file",
            )
        return _read_file(path, columns)
    if path.is_dir():
        return _read_directory(path, config, split, default_split, columns)
    if is_path_like(text) or path.suffix.lower() in {*STRICT_FORMATS, *DATASETS_FORMATS}:
        raise ModelNotFoundError(
            f"no such data file: {spec}", hint="check the path, or pass a data set id"
        )
    if not HUB_ID.fullmatch(text):
        raise ModelNotFoundError(
            f"no such data file, and not a data set id: {spec}",
            hint="pass a data file, a saved data set directory, or a data set id like org/name",
        )
    return _read_cached(text, config, split, default_split, columns, hub_cache)


# -- local files ---------------------------------------------------------------------------


def _read_file(path: Path, columns: Columns) -> TextDataset:
    """A local file: the strict readers for text formats, `datasets` for columnar ones."""
    suffix = path.suffix.lower()
    if suffix in DATASETS_FORMATS:
        with _datasets() as ds, tempfile.TemporaryDirectory(prefix="mposurgeon-data-") as tmp:
            try:
                table = ds.load_dataset(
                    DATASETS_FORMATS[suffix],
                    data_files=str(path),
                    split="train",
                    cache_dir=tmp,
                    keep_in_memory=True,
                )
            except Exception as exc:  # pyarrow, fsspec: any unreadable file
                raise DataError(
                    f"{path.name}: not a readable {suffix[1:]} file ({_first_line(exc)})"
                ) from None
            return _from_datasets(table, _file_source(path, "row"), columns, path)
    if suffix not in STRICT_FORMATS:
        raise DataError(f"{path.name}: unknown data format {suffix!r}", hint=_FORMATS_HINT)
    text = _read_text(path)
    kind = STRICT_FORMATS[suffix]
    if kind == "json" and text.lstrip().startswith("["):
        rows, unit = _json_array_rows(path, text), "row"
    elif kind in ("jsonl", "json"):
        rows, unit = list(_jsonl_rows(path, text)), "line"
    else:
        delimiter = "\t" if kind == "tsv" else ","
        rows, unit = _csv_rows(path, text, delimiter, columns.label_name), "line"
    if not rows:
        raise DataError(f"{path.name} holds no rows", hint="each row needs text and label")
    present = list(dict.fromkeys(key for _, row in rows for key in row))
    roles = columns.roles(path.name, present)
    examples = [_example(f"{path.name} {unit} {line}", line, row, roles) for line, row in rows]
    return _dataset(path, examples, _file_source(path, unit), roles.task)


def _file_source(path: Path, unit: str) -> DataSource:
    location = str(path.resolve())
    return DataSource("file", location, path.name, unit, files={location: sha256_file(path)})


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped); a clear error naming the
    line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path.name} line {line}: not UTF-8 text (byte {data[exc.start]:#04x})",
            hint="save the data file as UTF-8",
        ) from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    hint = "JSON Lines: one JSON object per line"
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path.name} line {line_no}: invalid JSON ({exc.msg})", hint=hint
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path.name} line {line_no}: expected a JSON object", hint=hint)
        yield line_no, row


def _json_array_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSON array, numbered from 1 (an invalid document names its line)."""
    hint = "a .json file holds one JSON object per line, or one array of objects"
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path.name} line {exc.lineno}: invalid JSON ({exc.msg})", hint=hint
        ) from None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path.name} row {i}: expected a JSON object", hint=hint)
    return list(enumerate(rows, 1))


def _csv_rows(
    path: Path, text: str, delimiter: str, label: str
) -> list[tuple[int, dict[str, Any]]]:
    """The non-blank rows of a CSV/TSV file with their line numbers; labels (column `label`)
    that are integers or decimal numbers as int or float.

    Strict CSV: an unterminated quoted field or text after a closing quote is an error naming
    the line where the record starts, and so is a header that names a column twice. Fields may
    be as long as the file (the csv module's default limit is 131,072 characters; a long text
    is legitimate, it is cut to `--max-length` tokens later); the process-wide limit is
    restored afterwards.
    """
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, dict[str, Any]]] = []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    end = 0  # the last line of the records read so far
    try:
        _check_header(path, reader.fieldnames or [])
        end = reader.line_num
        for row in reader:
            end = reader.line_num
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            value = row.get(label)
            if isinstance(value, str) and _is_int(value):
                row[label] = int(value)
            elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
                row[label] = float(value)
            rows.append((end, row))
    except csv.Error as exc:
        line = _record_start(text, end)
        if "unexpected end of data" in str(exc):
            problem = "unterminated quoted field (its closing quote is missing)"
        else:
            problem = f"malformed CSV ({exc})"
        raise DataError(
            f"{path.name} line {line}: {problem}",
            hint='quote fields that hold the delimiter, quotes or newlines: "a ""b"", c"',
        ) from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _check_header(path: Path, columns: Sequence[str]) -> None:
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise DataError(
                f"{path.name} line 1: column {column!r} appears twice in the header",
                hint="give every column its own name",
            )
        seen.add(column)


def _record_start(text: str, end: int) -> int:
    """The line where the record after line `end` starts (the reader skips blank lines)."""
    lines = text.split("\n")
    line = end
    while line < len(lines) and not lines[line].strip():
        line += 1
    return line + 1


#: A decimal number as CSV writes a real-valued label (no inf, nan or hex).
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _is_int(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def _example(where: str, line: int, row: dict[str, Any], roles: Roles) -> Example:
    """The example of one row (`where`: "file line N" for messages), its columns `roles`."""
    found = ", ".join(map(str, row)) or "nothing"
    if roles.text not in row:
        raise DataError(
            f"{where}: no text column {roles.text!r} (found {found})",
            hint="every row needs the same columns; name them with --text-column "
            "(--label-column, --target-column)",
        )
    if roles.text_pair is not None and roles.text_pair not in row and not roles.pair_optional:
        raise DataError(
            f"{where}: no column {roles.text_pair!r} (found {found})",
            hint="check --text-pair-column",
        )
    text, pair = row[roles.text], row.get(roles.text_pair) if roles.text_pair else None
    if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
        raise DataError(f"{where}: text must be a string")
    target = None
    if roles.target is not None:
        target = row.get(roles.target)
        if target is None:
            raise DataError(f"{where}: missing {roles.target!r}", hint="every row needs a target")
        if not isinstance(target, str):
            raise DataError(f"{where}: {roles.target!r} must be a string")
    label = None
    if roles.label is not None:
        label = row.get(roles.label)
        if label is None or label == "":
            raise DataError(f"{where}: missing {roles.label!r}", hint="every row needs a label")
        if isinstance(label, bool) or not isinstance(label, int | str | float):
            raise DataError(
                f"{where}: label {label!r} is neither a number nor a string",
                hint="one class (an integer or string) or one real value per row",
            )
        if isinstance(label, float) and not math.isfinite(label):
            raise DataError(f"{where}: label {label!r} is not a finite number")
    return Example(text=text, text_pair=pair, label=label, line=line, target=target)


def _dataset(
    path: Path,
    examples: list[Example],
    source: DataSource,
    task: str | None,
    classes: Sequence[str] | None = None,
) -> TextDataset:
    """The data set of `examples` read for `task` (None: regression when some label is a
    number with a fraction, else classification); `classes`: the names of a ClassLabel
    column, in its order."""
    if task is None:
        fractional = any(
            isinstance(ex.label, float) and not ex.label.is_integer() for ex in examples
        )
        task = "regression" if fractional and classes is None else "classification"
    where = f"{source.name} {source.unit}"
    if task == "regression":
        for ex in examples:
            if isinstance(ex.label, str):
                raise DataError(
                    f"{where} {ex.line}: label {ex.label!r} is not a number",
                    hint="regression reads one real value per row",
                )
        examples = [replace(ex, label=float(ex.label)) for ex in examples]  # type: ignore[arg-type]
        return TextDataset(path, examples, [], source, task)
    if task != "classification":
        return TextDataset(path, examples, [], source, task)
    for i, ex in enumerate(examples):
        if isinstance(ex.label, float):
            if not ex.label.is_integer():
                raise DataError(
                    f"{where} {ex.line}: label {ex.label!r} is not a class",
                    hint="real-valued labels are regression: pass --task regression",
                )
            examples[i] = replace(ex, label=int(ex.label))
    if classes is not None:
        present_labels = {ex.label for ex in examples}
        labels = [c for c in classes if c in present_labels]
    else:
        labels = _label_names([ex.label for ex in examples])  # type: ignore[misc]
    return TextDataset(path, examples, labels, source, task)


def _label_names(labels: Sequence[int | str]) -> list[str]:
    """Distinct labels in sorted order (integers numerically), as strings; the integer 1 and
    the string "1" are one label."""
    distinct = set(labels)
    ints = [str(v) for v in sorted(v for v in distinct if isinstance(v, int))]
    strs = sorted(v for v in distinct if isinstance(v, str) and v not in ints)
    return ints + strs


# -- data sets through `datasets` ------------------------------------------------------------


@contextmanager
def _datasets() -> Iterator[Any]:
    """The `datasets` module, offline (whatever HF_HUB_OFFLINE says: nothing is downloaded),
    without progress bars or log lines (stderr stays one line per error); restored after."""
    try:
        import datasets
        from datasets.utils import logging as ds_logging
    except ImportError:  # pragma: no cover - a dependency of mposurgeon
        raise UsageError(
            "reading this data needs the `datasets` package", hint="pip install datasets"
        ) from None
    saved = {k: getattr(datasets.config, k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    verbosity = ds_logging.get_verbosity()
    bars = not datasets.utils.are_progress_bars_disabled()
    for key in saved:
        setattr(datasets.config, key, True)
    ds_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        for key, value in saved.items():
            setattr(datasets.config, key, value)
        ds_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _datasets_cache() -> str | None:
    """HF_DATASETS_CACHE as set now (`datasets` read it when first imported), else None."""
    return os.environ.get("HF_DATASETS_CACHE") or None


def _read_directory(
    path: Path, config: str | None, split: str | None, default_split: str, columns: Columns
) -> TextDataset:
    """A `save_to_disk` directory, or a directory `datasets.load_dataset` reads."""
    location = str(path.resolve())
    with _datasets() as ds:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            if config is not None:
                raise UsageError(
                    f"{path.name} is a saved data set: --data-config does not apply",
                    hint="leave --data-config out (pick a split with --split)",
                )
            table, split = _load_saved(ds, path, split, default_split)
            # the Arrow files of the split and its fingerprint, as save_to_disk wrote them
            files = {e["filename"]: sha256_file(Path(e["filename"])) for e in table.cache_files}
            fingerprint = _saved_fingerprint(table) or table._fingerprint
            kind: Literal["saved", "directory"] = "saved"
        else:
            config = _check_config(ds, location, path.name, config)
            split = _check_split(ds, location, path.name, config, split or default_split)
            table = _load(ds, path.name, location, config, split)
            files, fingerprint, kind = {}, table._fingerprint, "directory"
        source = DataSource(
            kind,
            location,
            _display_name(path.name, config, split),
            unit="row",
            config=config,
            split=split,
            fingerprint=fingerprint,
            files=files,
        )
        return _from_datasets(table, source, columns, path)


def _load_saved(
    ds: Any, path: Path, split: str | None, default_split: str
) -> tuple[datasets.Dataset, str | None]:
    """The split of a `save_to_disk` directory and its name: of a DatasetDict, `split` (else
    `default_split`); a Dataset as it is (a `split` that is not its own is an error). Only
    that split is opened (`load_from_disk` of a whole DatasetDict fails on an empty split)."""
    if (path / "dataset_dict.json").is_file():
        splits = _saved_json(path, "dataset_dict.json").get("splits") or []
        own = split or default_split
        if own not in splits:
            raise UsageError(
                f"{path.name} has no split {own!r} (splits: {', '.join(map(str, splits))})",
                hint="pick one with --split (--eval-split for the eval data)",
            )
        directory = path / own
    else:
        own = _saved_json(path, "state.json").get("_split")
        if split is not None and split != own:
            raise UsageError(
                f"{path.name} is one saved Dataset (split {own or 'unnamed'}), not a "
                f"DatasetDict: it has no split {split!r}",
                hint="leave --split out",
            )
        directory = path
    if not _saved_json(directory, "state.json").get("_data_files"):
        raise _empty(_display_name(path.name, None, own), own)
    try:
        return ds.load_from_disk(str(directory)), own
    except Exception as exc:
        raise DataError(
            f"{path.name}: not a readable saved data set ({_first_line(exc)})"
        ) from None


def _saved_json(directory: Path, name: str) -> dict[str, Any]:
    """A JSON file `save_to_disk` wrote (dataset_dict.json, state.json)."""
    try:
        data = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{directory.name}: not a readable saved data set ({name}: {_first_line(exc)})"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{directory.name}: not a readable saved data set ({name})")
    return data


def _empty(name: str, split: str | None) -> DataError:
    where = f": split {split!r}" if split else ""
    return DataError(f"{name}{where} holds no rows", hint="each row needs text and label")


def _saved_fingerprint(table: datasets.Dataset) -> str | None:
    """The fingerprint `save_to_disk` wrote beside the split's Arrow files (`load_from_disk`
    derives another one from it when it sets the saved format)."""
    if not table.cache_files:
        return None
    state = Path(table.cache_files[0]["filename"]).parent / "state.json"
    try:
        return str(json.loads(state.read_text(encoding="utf-8"))["_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_cached(
    repo_id: str,
    config: str | None,
    split: str | None,
    default_split: str,
    columns: Columns,
    hub_cache: Path | None,
) -> TextDataset:
    """A data set id from the hub cache (a snapshot) or the `datasets` cache, never the net."""
    snapshot = _hub_snapshot(repo_id, hub_cache)
    with _datasets() as ds:
        if snapshot is not None:
            config = _check_config(ds, str(snapshot), repo_id, config)
            split = _check_split(ds, str(snapshot), repo_id, config, split or default_split)
            table = _load(ds, repo_id, str(snapshot), config, split)
            kind: Literal["hub", "cache"] = "hub"
            revision = snapshot.name
            where = snapshot
        else:
            loaded, config, where = _load_prepared(ds, repo_id, config)
            kind, revision = "cache", "/".join(where.parts[-2:])
            split = _check_split(ds, loaded, repo_id, config, split or default_split)
            table = loaded[split]
        source = DataSource(
            kind,
            repo_id,
            _display_name(repo_id, config, split),
            unit="row",
            config=config,
            split=split,
            revision=revision,
            fingerprint=table._fingerprint,
        )
        return _from_datasets(table, source, columns, where)


def _hub_snapshot(repo_id: str, hub_cache: Path | None) -> Path | None:
    """The cached snapshot of data set `repo_id` (its `main` ref), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if hub_cache is None and os.environ.get("HF_HUB_CACHE"):
        hub_cache = Path(os.environ["HF_HUB_CACHE"]).expanduser()
    try:
        return Path(
            snapshot_download(
                repo_id, repo_type="dataset", cache_dir=hub_cache, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _load_prepared(
    ds: Any, repo_id: str, config: str | None
) -> tuple[datasets.DatasetDict, str | None, Path]:
    """The Arrow files an earlier `load_dataset(repo_id, config)` prepared in the `datasets`
    cache: the data set, its configuration and its cache directory."""
    from datasets.naming import camelcase_to_snakecase

    root = Path(_datasets_cache() or ds.config.HF_DATASETS_CACHE).expanduser()
    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    cached = sorted(p.name for p in (root / "___".join(parts)).glob("*") if p.is_dir())
    fetch = f"python -c \"import datasets; datasets.load_dataset('{repo_id}'" + (
        f", '{config}')\"" if config else ')"'
    )
    if not cached:
        raise ModelNotFoundError(
            f"data set {repo_id} is not in the local Hugging Face cache (data sets are read "
            "offline, never downloaded)",
            hint=f"fetch it once online: {fetch}, or hf download {repo_id} --repo-type dataset",
        )
    if config is not None and config not in cached:
        raise UsageError(
            f"data set {repo_id} has no configuration {config!r} in the cache (cached: "
            f"{', '.join(cached)})",
            hint=f"pick one with --data-config, or fetch it once online: {fetch}",
        )
    if config is None and len(cached) > 1:
        raise UsageError(
            f"data set {repo_id} has several configurations cached: {', '.join(cached)}",
            hint="pick one with --data-config",
        )
    config = config or cached[0]
    try:
        loaded = ds.load_dataset(repo_id, name=config, cache_dir=_datasets_cache())
    except Exception as exc:  # datasets, pyarrow, fsspec: any unreadable cache
        raise DataError(f"{repo_id}: `datasets` could not read it ({_first_line(exc)})") from None
    any_split = next(iter(loaded.values()))
    return loaded, config, Path(any_split.cache_files[0]["filename"]).parent


def _check_config(ds: Any, location: str, name: str, config: str | None) -> str | None:
    """`config` checked against the configurations of the data set at `location` (None: its
    only one, or its default)."""
    try:
        configs = list(ds.get_dataset_config_names(location))
    except Exception as exc:
        raise DataError(
            f"{name}: not a data set `datasets` can read ({_first_line(exc)})"
        ) from None
    if config is not None and config not in configs:
        raise UsageError(
            f"data set {name} has no configuration {config!r} (configurations: "
            f"{', '.join(configs)})",
            hint="pick one with --data-config",
        )
    if config is None and len(configs) > 1:
        raise UsageError(
            f"data set {name} has several configurations: {', '.join(configs)}",
            hint="pick one with --data-config",
        )
    return config


def _check_split(ds: Any, location: str | Any, name: str, config: str | None, split: str) -> str:
    """`split`, checked to be one of the splits of the data set at `location` (a path, or a
    loaded DatasetDict)."""
    if isinstance(location, str):
        try:
            splits = list(ds.get_dataset_split_names(location, config_name=config))
        except Exception as exc:
            raise DataError(
                f"{name}: not a data set `datasets` can read ({_first_line(exc)})"
            ) from None
    else:
        splits = list(location)
    if split not in splits:
        raise UsageError(
            f"{name} has no split {split!r} (splits: {', '.join(splits)})",
            hint="pick one with --split (--eval-split for the eval data)",
        )
    return split


def _load(ds: Any, name: str, location: str, config: str | None, split: str) -> Any:
    """`datasets.load_dataset(location, config, split=split)`: a Dataset."""
    try:
        return ds.load_dataset(location, name=config, split=split, cache_dir=_datasets_cache())
    except Exception as exc:  # datasets, pyarrow, fsspec: any unreadable data set
        if "corresponds to no data" in str(exc):  # datasets' word for an empty split
            raise _empty(_display_name(name, config, split), split) from None
        raise DataError(f"{name}: `datasets` could not read it ({_first_line(exc)})") from None


def _display_name(base: str, config: str | None, split: str | None) -> str:
    """`glue (sst2, train)`: the data set as messages name it."""
    parts = [p for p in (config, split) if p]
    return f"{base} ({', '.join(parts)})" if parts else base


def _from_datasets(
    table: datasets.Dataset, source: DataSource, columns: Columns, path: Path
) -> TextDataset:
    """The examples of a `datasets.Dataset`; the columns checked once, the rows one by one."""
    import datasets

    name = source.name
    present = list(table.column_names)
    if len(table) == 0:
        raise _empty(name, source.split)
    roles = columns.roles(name, present)
    classes: list[str] | None = None
    if roles.label is not None:
        feature = table.features[roles.label]
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
        elif not isinstance(feature, datasets.Value):
            raise DataError(
                f"{name}: label column {roles.label!r} holds {type(feature).__name__} values, "
                "not one label per row",
                hint="a label column holds one class (an integer or string) or one real value "
                "per row",
            )
    wanted = [
        c for c in dict.fromkeys((roles.text, roles.text_pair, roles.label, roles.target)) if c
    ]
    data = table.select_columns(wanted).to_dict()
    examples = []
    for i in range(len(table)):
        where = f"{name} row {i + 1}"
        row = {c: data[c][i] for c in wanted}
        if classes is not None and isinstance(row[roles.label], int):
            row[roles.label] = _class_name(where, row[roles.label], classes, roles.label)
        examples.append(_example(where, i + 1, row, roles))
    task = roles.task
    if classes is not None and task is None:
        task = "classification"
    return _dataset(path, examples, source, task, classes)


def _class_name(where: str, value: int, classes: Sequence[str], column: str) -> str:
    """The name of class id `value` of a ClassLabel column."""
    if 0 <= value < len(classes):
        return classes[value]
    unlabelled = " (an unlabelled row: a test split?)" if value == -1 else ""
    raise DataError(
        f"{where}: label {value} is not a class of {column!r} ({', '.join(classes)}){unlabelled}",
        hint="train and evaluate on labelled splits",
    )
