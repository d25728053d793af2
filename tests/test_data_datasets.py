"""training/data.py through the `datasets` library: Parquet and Arrow files, `save_to_disk`
directories, data set ids from a Hugging Face cache layout read offline, the column flags, the
one-line errors, and a `train` run on a saved data set."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest

from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import DataError, ModelNotFoundError, MposurgeonError, UsageError
from mposurgeon.training.data import Columns, read_dataset
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SENTIMENT = [
    json.loads(line)
    for line in (REPO / "data" / "sentiment-train.jsonl").read_text(encoding="utf-8").splitlines()
]
TEXTS = [row["text"] for row in SENTIMENT[:12]]
NAMES = ["negative", "positive"]
IDS = [NAMES.index(row["label"]) for row in SENTIMENT[:12]]
FEATURES = datasets.Features(
    {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)}
)
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _table(n: int = 12, offset: int = 0) -> datasets.Dataset:
    """`n` sentiment rows as a Dataset: `sentence` and a ClassLabel `label`."""
    rows = SENTIMENT[offset : offset + n]
    return datasets.Dataset.from_dict(
        {"sentence": [r["text"] for r in rows], "label": [NAMES.index(r["label"]) for r in rows]},
        features=FEATURES,
    )


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty hub and `datasets` caches in tmp_path, offline as the environment says."""
    caches = {"hub": tmp_path / "hub", "datasets": tmp_path / "datasets-cache"}
    monkeypatch.setenv("HF_HUB_CACHE", str(caches["hub"]))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(caches["datasets"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return caches


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every attempt to reach the network (a name look-up or an IP connection), recorded and
    refused."""
    attempts: list[Any] = []

    def look_up(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "network access in a test")

    def connect(self: socket.socket, address: Any, *args: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network access in a test")
        return real_connect(self, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket, "getaddrinfo", look_up)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    yield attempts


def _repo_files(configs: dict[str, dict[str, datasets.Dataset]], tmp: Path) -> dict[str, bytes]:
    """The files of a data set repository: one Parquet file per config and split, and a
    README whose dataset card declares the configs (as the Hub's GLUE repository does)."""
    card = ["---", "configs:"]
    files: dict[str, bytes] = {}
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, table in splits.items():
            name = f"{config}/{split}-00000-of-00001.parquet"
            table.to_parquet(str(tmp / "part.parquet"))
            files[name] = (tmp / "part.parquet").read_bytes()
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    files["README.md"] = "\n".join([*card, "---", "# tiny sentiment", ""]).encode()
    return files


def _hub_dataset(
    hub: Path, repo_id: str, configs: dict[str, dict[str, datasets.Dataset]], tmp: Path
) -> Path:
    """A data set repository as `hf download REPO --repo-type dataset` leaves it in the hub
    cache: `datasets--org--name/{blobs,refs/main,snapshots/<rev>}`, the snapshot's files
    linked to blobs named by their sha256. Returns the snapshot directory."""
    repo = hub / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in _repo_files(configs, tmp).items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return snapshot


def _examples(data: Any) -> list[tuple[str, str | None, str]]:
    return [(e.text, e.text_pair, str(e.label)) for e in data.examples]


# -- local files ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet", "arrow"])
def test_every_file_format_gives_the_same_rows(tmp_path: Path, fmt: str) -> None:
    """One table written as JSON Lines, a JSON array, CSV, TSV, Parquet and Arrow reads back
    the same rows and labels (string labels: sorted), with a sha256 of the file read."""
    rows = [{"sentence": t, "label": NAMES[i]} for t, i in zip(TEXTS, IDS, strict=True)]
    path = tmp_path / f"d.{fmt}"
    table = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        table.to_csv(str(path), index=False, sep="," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(tmp_path / "saved"))
        path.write_bytes((tmp_path / "saved" / "data-00000-of-00001.arrow").read_bytes())
    data = read_dataset(path, columns=Columns(text="sentence"))
    assert _examples(data) == [(t, None, NAMES[i]) for t, i in zip(TEXTS, IDS, strict=True)]
    assert data.labels == NAMES and data.label_ids() == IDS
    assert data.record() == {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    with pytest.raises(DataError) as info:  # the default text column is missing
        read_dataset(path)
    assert str(info.value).startswith(f"d.{fmt}") and "sentence, label" in str(info.value)


def test_parquet_class_labels_and_pairs(tmp_path: Path) -> None:
    """A ClassLabel column gives its names, in its order (not sorted), for the classes that
    occur; a pair of texts in named columns; an integer label column of another name."""
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "gold": datasets.ClassLabel(names=["yes", "maybe", "no"]),
        }
    )
    table = datasets.Dataset.from_dict(
        {"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "gold": [2, 0, 2]},
        features=features,
    )
    table.to_parquet(str(tmp_path / "nli.parquet"))
    columns = Columns(text="premise", text_pair="hypothesis", label="gold")
    data = read_dataset(tmp_path / "nli.parquet", columns=columns)
    assert data.labels == ["yes", "no"]  # ClassLabel order; "maybe" does not occur
    assert _examples(data) == [("a", "x", "no"), ("b", "y", "yes"), ("c", "z", "no")]
    assert data.label_ids() == [1, 0, 1]


def test_strict_files_take_the_column_flags(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("review,stars,extra\ngood,5,x\nbad,1,y\nok,10,z\n", encoding="utf-8")
    data = read_dataset(path, columns=Columns(text="review", label="stars"))
    assert data.labels == ["1", "5", "10"]  # integers, sorted numerically
    assert [(e.text, e.label, e.line) for e in data.examples] == [
        ("good", 5, 2),
        ("bad", 1, 3),
        ("ok", 10, 4),
    ]
    with pytest.raises(DataError, match=r"^d\.csv: no column 'title' \(columns: review"):
        read_dataset(path, columns=Columns(text="title", label="stars"))
    with pytest.raises(DataError, match=r"^d\.csv: no column 'other' \(columns: review"):
        read_dataset(path, columns=Columns(text="review", text_pair="other", label="stars"))
    with pytest.raises(DataError, match=r"^d\.csv: no label column 'label' \(columns: review"):
        read_dataset(path, columns=Columns(text="review"))


# -- save_to_disk ----------------------------------------------------------------------------


def test_saved_dataset(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    _table().save_to_disk(str(saved))
    data = read_dataset(saved, columns=Columns(text="sentence"))
    assert _examples(data) == [(t, None, NAMES[i]) for t, i in zip(TEXTS, IDS, strict=True)]
    assert data.labels == NAMES
    arrow = saved / "data-00000-of-00001.arrow"
    record = data.record()
    assert record["path"] == str(saved.resolve()) and record["source"] == "saved"
    assert record["files"] == {str(arrow): hashlib.sha256(arrow.read_bytes()).hexdigest()}
    assert record["fingerprint"] == json.loads((saved / "state.json").read_text())["_fingerprint"]
    with pytest.raises(UsageError, match="one saved Dataset .* no split 'validation'"):
        read_dataset(saved, split="validation", columns=Columns(text="sentence"))
    with pytest.raises(UsageError, match="--data-config does not apply"):
        read_dataset(saved, config="sst2", columns=Columns(text="sentence"))


def test_saved_dataset_dict_splits(tmp_path: Path) -> None:
    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": _table(8), "validation": _table(4, offset=8)}).save_to_disk(
        str(saved)
    )
    columns = Columns(text="sentence")
    train = read_dataset(saved, columns=columns)  # the train split by default
    assert [e.text for e in train.examples] == TEXTS[:8] and train.record()["split"] == "train"
    assert train.name == "dict (train)"
    valid = read_dataset(saved, split="validation", columns=columns)
    assert [e.text for e in valid.examples] == TEXTS[8:12]
    assert read_dataset(saved, default_split="validation", columns=columns).examples == (
        valid.examples
    )
    with pytest.raises(UsageError) as info:
        read_dataset(saved, split="test", columns=columns)
    assert "no split 'test' (splits: train, validation)" in str(info.value)


# -- a data set id from the local Hugging Face cache ------------------------------------------


def test_cached_hub_dataset_offline(
    hf_home: dict[str, Path], tmp_path: Path, no_network: list[Any]
) -> None:
    """A data set in the hub cache layout is read by id, offline: its configuration and split,
    the ClassLabel names, the snapshot's revision in the record; never the network."""
    _hub_dataset(
        hf_home["hub"],
        "org/tiny-sentiment",
        {
            "sst": {"train": _table(8), "validation": _table(4, offset=8)},
            "small": {"train": _table(3)},
        },
        tmp_path,
    )
    columns = Columns(text="sentence")
    data = read_dataset("org/tiny-sentiment", config="sst", split="train", columns=columns)
    assert [e.text for e in data.examples] == TEXTS[:8] and data.labels == NAMES
    assert data.name == "org/tiny-sentiment (sst, train)"
    record = data.record()
    assert record["id"] == "org/tiny-sentiment" and record["source"] == "hub"
    assert (record["config"], record["split"], record["revision"]) == ("sst", "train", REVISION)
    assert record["fingerprint"]
    valid = read_dataset("org/tiny-sentiment", config="sst", split="validation", columns=columns)
    assert [e.text for e in valid.examples] == TEXTS[8:12]
    small = read_dataset("org/tiny-sentiment", config="small", columns=columns)
    assert len(small) == 3
    with pytest.raises(UsageError, match=r"several configurations: sst, small"):
        read_dataset("org/tiny-sentiment", columns=columns)
    with pytest.raises(UsageError, match=r"no configuration 'sst2' \(configurations: sst, small"):
        read_dataset("org/tiny-sentiment", config="sst2", columns=columns)
    with pytest.raises(UsageError, match=r"no split 'test' \(splits: train, validation\)"):
        read_dataset("org/tiny-sentiment", config="sst", split="test", columns=columns)
    assert no_network == []


def test_datasets_cache_without_the_hub_files(
    hf_home: dict[str, Path], tmp_path: Path, no_network: list[Any]
) -> None:
    """Arrow files an earlier `load_dataset` prepared in HF_DATASETS_CACHE are found by id
    when the hub cache lacks the repository (the path `datasets` itself takes offline)."""
    # `load_dataset` names its preparation after the data set: a directory named as the id
    source = tmp_path / "repo" / "tinysent"
    for name, content in _repo_files({"sst": {"train": _table(6)}}, tmp_path).items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    datasets.load_dataset(str(source), "sst", cache_dir=str(hf_home["datasets"]))
    shutil.rmtree(source)
    assert (hf_home["datasets"] / "tinysent" / "sst").is_dir()
    data = read_dataset("tinysent", columns=Columns(text="sentence"))
    assert [e.text for e in data.examples] == TEXTS[:6] and data.labels == NAMES
    record = data.record()
    assert record["source"] == "cache" and record["config"] == "sst"
    assert record["revision"].startswith("0.0.0/")
    with pytest.raises(UsageError, match=r"no configuration 'cola' in the cache \(cached: sst\)"):
        read_dataset("tinysent", config="cola", columns=Columns(text="sentence"))
    assert no_network == []


@pytest.mark.parametrize("offline", ["1", None])
def test_cache_miss_says_how_to_fetch(
    hf_home: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    no_network: list[Any],
    offline: str | None,
) -> None:
    """A data set id in neither cache: one line naming it and how to fetch it, online mode or
    not (data sets are never downloaded)."""
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.delenv("HF_DATASETS_OFFLINE")
    with pytest.raises(ModelNotFoundError) as info:
        read_dataset("glue", config="sst2", split="train")
    assert str(info.value) == (
        "data set glue is not in the local Hugging Face cache (data sets are read offline, "
        "never downloaded)"
    )
    assert info.value.hint is not None
    assert "python -c \"import datasets; datasets.load_dataset('glue', 'sst2')\"" in (
        info.value.hint
    )
    assert "hf download glue --repo-type dataset" in info.value.hint
    assert no_network == []


# -- errors ----------------------------------------------------------------------------------


def _saved(tmp_path: Path, table: datasets.Dataset, name: str = "saved") -> Path:
    table.save_to_disk(str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize(
    ("table", "columns", "error", "needles"),
    [
        (
            {"sentence": ["a"], "label": [1]},
            Columns(),
            DataError,
            ["saved: no text column 'text'", "columns: sentence, label"],
        ),
        (
            {"text": ["a"], "label": [1]},
            Columns(text="review"),
            DataError,
            ["saved: no column 'review' (columns: text, label)"],
        ),
        (
            {"text": ["a"], "label": [1]},
            Columns(text_pair="other"),
            DataError,
            ["saved: no column 'other' (columns: text, label)"],
        ),
        (
            {"text": ["a"], "y": [1]},
            Columns(),
            DataError,
            ["saved: no label column 'label' (columns: text, y)"],
        ),
        (
            {"text": ["a", "b"], "label": [0.5, 1.0]},
            Columns(task="classification"),
            DataError,
            ["saved row 1: label 0.5 is not a class"],
        ),
        (
            {"text": ["a", None], "label": [1, 0]},
            Columns(),
            DataError,
            ["saved row 2: text must be a string"],
        ),
        (
            {"text": ["a", "b"], "label": ["x", None]},
            Columns(),
            DataError,
            ["saved row 2: missing 'label'"],
        ),
        (
            {"text": ["a"], "label": [[1, 2]]},
            Columns(),
            DataError,
            ["label column 'label' holds", "not one label per row"],
        ),
    ],
)
def test_column_and_value_errors(
    tmp_path: Path,
    table: dict[str, list[Any]],
    columns: Columns,
    error: type[MposurgeonError],
    needles: list[str],
) -> None:
    path = _saved(tmp_path, datasets.Dataset.from_dict(table))
    with pytest.raises(error) as info:
        read_dataset(path, columns=columns)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_empty_split_and_unlabelled_class(tmp_path: Path) -> None:
    """An empty split, saved or in a directory of data files named by split (which `datasets`
    reads too: its other splits stay readable); a ClassLabel row without a class."""
    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": _table(4), "test": _table(0)}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"^dict \(test\): split 'test' holds no rows$"):
        read_dataset(saved, split="test")
    assert len(read_dataset(saved, columns=Columns(text="sentence"))) == 4
    files = tmp_path / "files"
    files.mkdir()
    _table(5).to_parquet(str(files / "train.parquet"))
    _table(0).to_parquet(str(files / "test.parquet"))
    with pytest.raises(DataError, match=r"^files \(test\): split 'test' holds no rows$"):
        read_dataset(files, split="test", columns=Columns(text="sentence"))
    train = read_dataset(files, columns=Columns(text="sentence"))
    assert [e.text for e in train.examples] == TEXTS[:5] and train.labels == NAMES
    assert train.record()["source"] == "directory" and train.record()["split"] == "train"
    unlabelled = datasets.Dataset.from_dict(
        {"sentence": ["a", "b"], "label": [1, -1]}, features=FEATURES
    )
    path = _saved(tmp_path, unlabelled, "test-split")
    with pytest.raises(DataError) as info:
        read_dataset(path, columns=Columns(text="sentence"))
    assert str(info.value) == (
        "test-split row 2: label -1 is not a class of 'label' (negative, positive) "
        "(an unlabelled row: a test split?)"
    )


def test_split_or_config_on_a_file_and_missing_paths(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"d\.jsonl is one file: --data-config and --split"):
        read_dataset(path, split="train")
    with pytest.raises(UsageError, match=r"d\.jsonl is one file"):
        read_dataset(path, config="sst2")
    for missing in ("nope.parquet", str(tmp_path / "nope"), "./glue"):
        with pytest.raises(ModelNotFoundError, match="no such data file"):
            read_dataset(missing)
    with pytest.raises(ModelNotFoundError, match="not a data set id"):
        read_dataset("a b")


# -- train -----------------------------------------------------------------------------------


def test_train_on_a_saved_dataset_dict(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --data DIR --text-column sentence --eval-split validation`: the train split for
    training, the validation split of the same set for evaluation, ClassLabel names as the
    model's labels, and the manifest records what was read."""
    saved = tmp_path / "sentiment"
    datasets.DatasetDict({"train": _table(24), "validation": _table(8, offset=24)}).save_to_disk(
        str(saved)
    )
    out = tmp_path / "trained"
    result = run_cli(
        capsys, "train", tiny_mpo, "-o", out, "--method", "lightweight", "--data", saved,
        "--text-column", "sentence", "--eval-split", "validation", "--max-steps", "2",
        "--batch-size", "8", "--json", "-q",
    )  # fmt: skip
    assert result.code == 0, result
    metrics = json.loads(result.out)["metrics"]
    assert metrics["steps"] == 2 and metrics["train_rows"] == 24 and metrics["eval_rows"] == 8
    manifest = read_manifest(out)
    data = manifest.metrics["data"]  # type: ignore[index]
    assert data["train"]["path"] == str(saved.resolve()) and data["train"]["split"] == "train"
    assert data["eval"]["split"] == "validation"
    assert data["train"]["fingerprint"] != data["eval"]["fingerprint"]
    assert manifest.options["text_column"] == "sentence"
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_train_on_a_cached_data_set_id(
    tiny_mpo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    hf_home: dict[str, Path],
    no_network: list[Any],
) -> None:
    """`--data ID --data-config C --eval-data ID --eval-split validation`: both splits of a
    data set in the hub cache, offline; the manifest records the id, config, splits and the
    snapshot's revision."""
    splits = {"train": _table(16), "validation": _table(8, offset=16)}
    _hub_dataset(hf_home["hub"], "org/sentiment", {"sst": splits, "other": splits}, tmp_path)
    out = tmp_path / "trained"
    result = run_cli(
        capsys, "train", tiny_mpo, "-o", out, "--method", "lightweight",
        "--data", "org/sentiment", "--data-config", "sst", "--text-column", "sentence",
        "--eval-data", "org/sentiment", "--eval-split", "validation", "--max-steps", "1",
        "--batch-size", "8", "--json", "-q",
    )  # fmt: skip
    assert result.code == 0, result
    data = read_manifest(out).metrics["data"]  # type: ignore[index]
    for key, split in (("train", "train"), ("eval", "validation")):
        assert data[key]["id"] == "org/sentiment" and data[key]["source"] == "hub"
        assert (data[key]["config"], data[key]["split"]) == ("sst", split)
        assert data[key]["revision"] == REVISION
    assert json.loads(result.out)["metrics"]["eval_rows"] == 8
    assert no_network == []


def test_train_errors_are_one_line(
    tiny_mpo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], hf_home: dict[str, Path]
) -> None:
    out = tmp_path / "o"
    base = ["train", tiny_mpo, "-o", out, "--method", "lightweight", "--max-steps", "1"]
    result = run_cli(capsys, *base, "--data", "glue", "--data-config", "sst2")
    assert_one_line_error(result, 4, "data set glue is not in the local", "hf download glue")
    one_label = _saved(tmp_path, _table(12).filter(lambda row: row["label"] == 1), "one")
    result = run_cli(capsys, *base, "--data", one_label, "--text-column", "sentence")
    assert_one_line_error(result, 2, "one holds a single label ('positive')")
    saved = _saved(tmp_path, _table(12))
    result = run_cli(
        capsys, *base, "--data", saved, "--text-column", "sentence", "--label-column", "stars"
    )
    assert_one_line_error(result, 1, "no label column 'stars' (columns: sentence, label)")
    result = run_cli(
        capsys, *base, "--data", saved, "--text-column", "sentence", "--eval-split", "validation"
    )
    assert_one_line_error(result, 2, "one saved Dataset", "no split 'validation'")
    assert not out.exists()
