"""Labelled text data for `train` and `select --method fisher`: local JSONL or CSV.

A row holds `text` (or `text_a` and optionally `text_b`) and `label`. Labels are integers or
strings; they are mapped to ids 0..K-1 in sorted order (integers numerically), and the names are
kept for `id2label`. Every problem is reported with the file name and line number.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mposurgeon.errors import DataError, ModelNotFoundError, UsageError

TEXT_COLUMNS = (("text", None), ("text_a", "text_b"))


@dataclass(frozen=True)
class Example:
    """One labelled row: text, optional second text, label as written in the file."""

    text: str
    text_pair: str | None
    label: int | str
    line: int


@dataclass
class TextDataset:
    """Rows of one file and the label mapping (`labels[i]` is the name of label id i)."""

    path: Path
    examples: list[Example]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def label_ids(self) -> list[int]:
        """The label id of every example."""
        mapping = self.label2id
        out = []
        for ex in self.examples:
            name = str(ex.label)
            if name not in mapping:
                raise DataError(
                    f"{self.path.name} line {ex.line}: label {ex.label!r} is not one of the "
                    f"training labels ({', '.join(self.labels)})"
                )
            out.append(mapping[name])
        return out

    def with_labels(self, labels: Sequence[str]) -> TextDataset:
        """The same rows mapped with another label list (eval data uses the training labels)."""
        dataset = TextDataset(self.path, self.examples, list(labels))
        dataset.label_ids()  # fail early, naming the line, on an unknown label
        return dataset


def read_dataset(path: str | Path) -> TextDataset:
    """Read a `.jsonl`/`.json` (one object per line) or `.csv` file of labelled text."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(path)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"{path.name}: unknown data format {suffix!r}", hint="use .jsonl or .csv files"
        )
    examples = [_example(path, line, row) for line, row in rows]
    if not examples:
        raise DataError(f"{path.name} holds no rows", hint="each row needs text and label")
    return TextDataset(path, examples, _label_names([ex.label for ex in examples]))


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


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    hint = "JSON Lines: one JSON object per line"
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
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


def _csv_rows(path: Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    """The non-blank rows of a CSV/TSV file with their line numbers.

    Strict CSV: an unterminated quoted field or text after a closing quote is an error naming
    the line where the record starts, and so is a header that names a column twice. Fields may
    be as long as the file (the csv module's default limit is 131,072 characters; a long text
    is legitimate, it is cut to `--max-length` tokens later); the process-wide limit is
    restored afterwards.
    """
    text = _read_text(path)
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
            label = row.get("label")
            if isinstance(label, str) and _is_int(label):
                row["label"] = int(label)
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


def _is_int(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def _example(path: Path, line: int, row: dict[str, Any]) -> Example:
    where = f"{path.name} line {line}"
    for first, second in TEXT_COLUMNS:
        if first in row:
            text, pair = row[first], row.get(second) if second else None
            break
    else:
        raise DataError(
            f"{where}: no text column (found {', '.join(map(str, row)) or 'nothing'})",
            hint="each row needs 'text' (or 'text_a' and 'text_b') and 'label'",
        )
    if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
        raise DataError(f"{where}: text must be a string")
    if "label" not in row or row["label"] in (None, ""):
        raise DataError(f"{where}: missing 'label'", hint="every row needs a label")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise DataError(f"{where}: label {label!r} is neither an integer nor a string")
    return Example(text=text, text_pair=pair, label=label, line=line)


def _label_names(labels: Sequence[int | str]) -> list[str]:
    """Distinct labels in sorted order (integers numerically), as strings; the integer 1 and
    the string "1" are one label."""
    distinct = set(labels)
    ints = [str(v) for v in sorted(v for v in distinct if isinstance(v, int))]
    strs = sorted(v for v in distinct if isinstance(v, str) and v not in ints)
    return ints + strs


def encode(dataset: TextDataset, tokenizer: Any, max_length: int = 128) -> list[dict[str, Any]]:
    """Tokenize every example, unpadded, with its `labels` id: feed batches of these to
    `transformers.DataCollatorWithPadding(tokenizer)`. A tokenizer that turns every row into
    special tokens only (all unknown, or nothing) does not fit the data: a usage error."""
    texts = [ex.text for ex in dataset.examples]
    pairs = [ex.text_pair or "" for ex in dataset.examples]
    has_pairs = any(ex.text_pair is not None for ex in dataset.examples)
    enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
    special = set(tokenizer.all_special_ids)
    if not any(set(ids) - special for ids in enc["input_ids"]):
        unk = f" ({tokenizer.unk_token})" if tokenizer.unk_token else ""
        raise UsageError(
            f"the tokenizer maps every word of {dataset.path.name} to its unknown token{unk} "
            "or to nothing: it does not fit this data",
            hint="train a checkpoint whose tokenizer covers the language of the data",
        )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [
        {**{k: enc[k][i] for k in keys}, "labels": label}
        for i, label in enumerate(dataset.label_ids())
    ]
