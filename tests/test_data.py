"""training/data.py: labelled JSONL/CSV files; every bad file is one error naming file and line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mposurgeon.errors import DataError, ModelNotFoundError
from mposurgeon.training.data import read_dataset

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_shipped_sentiment_data() -> None:
    train = read_dataset(REPO / "data" / "sentiment-train.jsonl")
    evaluation = read_dataset(REPO / "data" / "sentiment-eval.jsonl")
    assert train.labels == ["negative", "positive"] and len(train) == 320
    assert set(evaluation.with_labels(train.labels).label_ids()) == {0, 1}


def test_jsonl_labels_ids_and_pairs(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "pairs.jsonl",
        '{"text_a": "a", "text_b": "b", "label": 10}\n\n'
        '{"text_a": "c", "label": 2}\r\n{"text_a": "d\u2028e", "text_b": "f", "label": "10"}\n',
    )
    data = read_dataset(path)
    # integers sort numerically; the integer 10 and the string "10" are one label
    assert data.labels == ["2", "10"]
    assert data.label_ids() == [1, 0, 1]
    assert [(e.text, e.text_pair, e.line) for e in data.examples] == [
        ("a", "b", 1),
        ("c", None, 3),
        ("d\u2028e", "f", 4),
    ]


def test_csv_with_bom_and_int_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.csv", b'\xef\xbb\xbftext,label\n"x, y",1\n\nz,0\n')
    data = read_dataset(path)
    assert data.labels == ["0", "1"] and data.label_ids() == [1, 0]
    assert [(e.text, e.line) for e in data.examples] == [("x, y", 2), ("z", 4)]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("nocol.jsonl", '{"text": "a", "label": 1}\n{"sentence": "b", "label": 0}\n', "line 2"),
        ("nolabel.jsonl", '{"text": "a"}\n', ": no label column 'label' (columns: text)"),
        ("nolabel.csv", "text\nhello\n", ": no label column 'label' (columns: text)"),
        ("unlabelled-row.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: missing"),
        ("float.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": "x"}\n', "line 2"),
        ("list.jsonl", '{"text": "a", "label": [1]}\n', "neither a number nor a string"),
        ("bool.jsonl", '{"text": "a", "label": true}\n', "neither a number nor a string"),
        ("text.jsonl", '{"text": 3, "label": 1}\n', "line 1: text must be a string"),
        (
            "bad.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
            "line 2: invalid JSON",
        ),
        ("array.jsonl", '[{"text": "a", "label": 1}]\n', "line 1: expected a JSON object"),
        ("empty.jsonl", "", "holds no rows"),
        ("blank.jsonl", "\n  \n", "holds no rows"),
        ("header.csv", "text,label\n", "holds no rows"),
        ("binary.jsonl", b'{"text": "a", "label": 1}\n{"text": "\xff"}\n', "line 2: not UTF-8"),
        ("binary.csv", b"text,label\na,1\nb,0\n\xfe,1\n", "line 4: not UTF-8"),
        ("data.txt", "a\n", "unknown data format"),
        ("open.csv", 'text,label\na,1\n\n"b,0\nc,1\n', "line 4: unterminated quoted field"),
        ("open.tsv", 'text\tlabel\na\t1\n"b\t0\n', "line 3: unterminated quoted field"),
        ("stray.csv", 'text,label\na,1\n"b"c,0\n', "line 3: malformed CSV"),
        ("open-header.csv", 'text,"label\na,1\n', "line 1: unterminated quoted field"),
        ("twice.csv", "text,label,text\na,1,b\n", "line 1: column 'text' appears twice"),
        ("twice-label.csv", "label,text,label\n1,a,0\n", "column 'label' appears twice"),
    ],
)
def test_bad_files_name_the_file_and_line(
    tmp_path: Path, name: str, content: str | bytes, needle: str
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        read_dataset(path)
    message = str(info.value)
    assert message.startswith(name) and needle in message, message
    assert "\n" not in message


def test_missing_file_and_unknown_eval_label(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such data file"):
        read_dataset(tmp_path / "nope.jsonl")
    train = read_dataset(_write(tmp_path, "t.jsonl", '{"text": "a", "label": "x"}\n'))
    evaluation = read_dataset(_write(tmp_path, "e.jsonl", '\n{"text": "b", "label": "y"}\n'))
    with pytest.raises(DataError, match=r"e\.jsonl line 2: label 'y' is not one of"):
        evaluation.with_labels(train.labels)


def test_csv_fields_longer_than_the_csv_module_default_are_read(tmp_path: Path) -> None:
    """csv refuses fields over 131,072 characters by default; a long text is legitimate (it is
    cut to --max-length tokens later), so the reader allows fields as long as the file."""
    long = "word " * 60_000
    path = _write(tmp_path, "long.csv", f'text,label\n"{long}",1\nshort,0\n')
    data = read_dataset(path)
    assert [(e.text, e.line) for e in data.examples] == [(long, 2), ("short", 3)]
    assert csv.field_size_limit() == 131_072  # the process-wide limit is left as it was
