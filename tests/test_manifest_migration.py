"""Manifest format version 1 -> 2, on real version-1 artifacts (tests/data/v1, written by the
code of commit 2755aee; see its README.md): they read as version 2, and inspect, train (every
training method), merge and truncate take them; newer or unknown formats are refused in one
line.

The checked-in artifacts are copied before every use: a test never touches them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mposurgeon.artifact.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SelectionRecord,
    load_artifact,
    manifest_sha256,
    read_manifest,
)
from mposurgeon.methods.mpo.record import MPORecord
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V1 = Path(__file__).resolve().parent / "data" / "v1"
REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
ARTIFACTS = ("decompose", "train", "select")
#: A module decomposed in every v1 artifact with MPO modules (train names it with `bert.`).
FFN1 = "encoder.layer.0.intermediate.dense"


def _raw(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def v1(tmp_path: Path) -> Callable[[str], Path]:
    """`v1(name)`: a fresh copy of the checked-in version-1 artifact `name` in tmp_path."""

    def copy(name: str) -> Path:
        target = tmp_path / "v1" / name
        shutil.copytree(V1 / name, target)
        return target

    return copy


# -- the fixture is what version 1 wrote ---------------------------------------------------------


@pytest.mark.parametrize("name", ARTIFACTS)
def test_the_fixtures_are_version_1_on_disk(name: str) -> None:
    """Guards the fixture itself: regenerated with newer code it would test nothing."""
    raw = _raw(V1 / name)
    assert raw["format_version"] == 1 and raw["tool_version"] == "0.1.0"
    assert all("method" not in record for record in raw["modules"].values())
    if name == "train":
        assert {"mode", "mpo_lr", "mpo_modules"} <= set(raw["metrics"])
        assert not {"method", "method_options", "modules"} & set(raw["metrics"])
    total = sum(p.stat().st_size for p in (V1 / name).iterdir())
    assert total < 200_000  # tiny on purpose: the three together stay well under 1 MB


# -- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARTIFACTS)
def test_v1_artifact_reads_as_version_2(name: str, v1: Callable[[str], Path]) -> None:
    art = v1(name)
    raw = _raw(art)
    manifest = load_artifact(art)  # file list, cores against records, checksums
    assert manifest.format_version == FORMAT_VERSION == 2
    assert manifest.stage == raw["stage"] and len(manifest.lineage) == len(raw["lineage"])
    assert set(manifest.modules) == set(raw["modules"])
    assert len(manifest.modules) == (0 if name == "select" else 10)
    for key, record in manifest.modules.items():
        assert isinstance(record, MPORecord) and record.method == "mpo"
        dumped = record.model_dump(mode="json")
        assert {k: dumped[k] for k in raw["modules"][key]} == raw["modules"][key]
    assert _raw(art)["format_version"] == 1  # migrated in memory only


def test_v1_train_metrics_name_the_method(v1: Callable[[str], Path]) -> None:
    art = v1("train")
    raw = _raw(art)["metrics"]
    metrics = read_manifest(art).metrics
    assert metrics is not None
    assert metrics["method"] == "lightweight" == raw["mode"]
    assert metrics["method_options"] == {"lr": raw["lr"], "mpo_lr": raw["mpo_lr"]}
    assert metrics["modules"] == raw["mpo_modules"] == 10
    assert not {"mode", "mpo_lr", "mpo_modules"} & set(metrics)
    assert metrics["eval_accuracy"] == raw["eval_accuracy"] is not None
    assert metrics["eval_rows"] == 112 and metrics["steps"] == 4


def test_v1_selection_reads_as_a_record_and_writes_back_unchanged(
    v1: Callable[[str], Path],
) -> None:
    art = v1("select")
    raw = _raw(art)["selection"]
    manifest = read_manifest(art)
    selection = manifest.selection
    assert isinstance(selection, SelectionRecord)
    assert selection.method == "magnitude" and selection.top_n == 2 and selection.split_num == 2
    assert selection.chosen == raw["chosen"] and len(selection.chosen) == 6
    assert selection.scores == raw["scores"] and selection.patterns == raw["patterns"]
    assert selection.data is None and selection.schedule is not None
    assert [r.epoch for r in selection.schedule.rounds] == [0, 1]
    assert selection.schedule.rounds[0].chosen == raw["chosen"]
    assert selection.schedule.rounds[1].chosen is None
    assert selection.model_dump(mode="json") == raw
    assert json.loads(manifest.model_dump_json())["selection"] == raw


@pytest.mark.parametrize("name", ARTIFACTS)
def test_inspect_json_of_v1_artifact(
    name: str, v1: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    art = v1(name)
    raw = _raw(art)
    result = run_cli(capsys, "inspect", art, "--json")
    assert result.code == 0, result
    report = json.loads(result.out)
    assert report["format_version"] == 2 and report["stage"] == name
    assert len([m for m in report["modules"] if m["kind"] == "mpo"]) == len(raw["modules"])
    if name == "train":
        assert report["metrics"]["method"] == "lightweight"
        assert report["params"]["trainable"] == raw["metrics"]["trainable_params"]
    if name == "select":
        assert report["selection"] == raw["selection"]
    else:
        assert report["selection"] is None  # every optional part of the schema is present
    text = run_cli(capsys, "inspect", art)
    assert text.code == 0, text
    assert ("selection (magnitude, top 2 per pattern in 2 rounds)" in text.out) == (
        name == "select"
    )


# -- stages on version-1 inputs ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["lightweight", "overparam"])
def test_train_on_v1_decompose_writes_version_2(
    method: str, v1: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dec = v1("decompose")
    before = _files(dec)
    out = tmp_path / "trained"
    args = ("--data", TRAIN, "--eval-data", EVAL, "--max-steps", "2", "--batch-size", "8")
    result = run_cli(capsys, "train", dec, "-o", out, "--method", method, *args, "-q")
    assert result.code == 0, result
    raw = _raw(out)
    assert raw["format_version"] == 2 and raw["stage"] == "train"
    assert [e["stage"] for e in raw["lineage"]] == ["decompose", "train"]
    assert raw["parent"]["manifest_sha256"] == manifest_sha256(dec)
    assert all(record["method"] == "mpo" for record in raw["modules"].values())
    assert raw["metrics"]["method"] == method and raw["metrics"]["modules"] == 10
    assert "mode" not in raw["metrics"] and raw["metrics"]["eval_accuracy"] is not None
    record = read_manifest(out).modules[f"bert.{FFN1}"]
    assert isinstance(record, MPORecord)
    if method == "overparam":
        assert record.trainable == [0, 1, 2]
    else:  # the cores version 1's lightweight training trained
        assert record.trainable == _raw(V1 / "train")["modules"][f"bert.{FFN1}"]["trainable"]
    assert _files(dec) == before  # the input, still version 1, untouched


def _contracted(cores: list[torch.Tensor]) -> torch.Tensor:
    """Three cores (r0, I_k, J_k, r3) contracted by hand into the (I1 I2 I3, J1 J2 J3) matrix."""
    a, b, c = cores
    full = torch.einsum("xipy,yjqz,zkrw->ijkpqr", a.double(), b.double(), c.double())
    out = a.shape[1] * b.shape[1] * c.shape[1]
    return full.reshape(out, -1)


@pytest.mark.parametrize("name", ["decompose", "train"])
def test_merge_verify_of_v1_artifact(
    name: str, v1: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = v1(name)
    out = tmp_path / "merged"
    result = run_cli(capsys, "merge", art, "-o", out, "--verify", "--json", "-q")
    assert result.code == 0, result  # --verify: the merged outputs equal the factorized ones
    raw = _raw(out)
    assert raw["format_version"] == 2 and raw["modules"] == {}
    assert raw["metrics"]["verify"]["ok"] is True
    module = f"bert.{FFN1}" if name == "train" else FFN1
    record = _raw(art)["modules"][module]
    cores = load_file(art / "model.safetensors")
    by_hand = _contracted([cores[f"{module}.mpo.core.{k}"] for k in range(3)])
    assert by_hand.shape == (64, 32) and record["shape"] == [64, 32]
    merged = load_file(out / "model.safetensors")
    assert not any(".mpo.core." in key for key in merged)
    torch.testing.assert_close(merged[f"{module}.weight"].double(), by_hand, rtol=1e-5, atol=1e-6)


def test_truncate_of_v1_decompose(
    v1: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dec = v1("decompose")
    out = tmp_path / "trunc"
    result = run_cli(capsys, "truncate", dec, "-o", out, "--max-bond", "4", "-q")
    assert result.code == 0, result
    raw = _raw(out)
    assert raw["format_version"] == 2 and [e["stage"] for e in raw["lineage"]] == [
        "decompose",
        "truncate",
    ]
    assert set(raw["modules"]) == set(_raw(dec)["modules"])
    for record in raw["modules"].values():
        assert record["method"] == "mpo" and max(record["bonds"]) <= 4
    assert read_manifest(out).modules[FFN1].rel_error > 0  # measured: bonds of 8 and 16 cut


def test_decompose_and_dynamic_train_follow_a_v1_selection(
    v1: Callable[[str], Path], tmp_path: Path
) -> None:
    import mposurgeon

    sel = v1("select")
    chosen = _raw(sel)["selection"]["chosen"]
    dec = mposurgeon.decompose(sel, output=tmp_path / "dec", num_cores=3)
    manifest = read_manifest(dec.output)
    assert sorted(manifest.modules) == sorted(chosen)
    assert manifest.selection is not None
    assert manifest.selection.model_dump(mode="json") == _raw(sel)["selection"]

    out = tmp_path / "trained"  # two rounds: round 0 is the v1 choice, train scores round 1
    mposurgeon.train(sel, output=out, data=TRAIN, method="overparam", epochs=2, batch_size=64)
    selection = read_manifest(out).selection
    assert selection is not None and selection.schedule is not None
    first, second = (r.chosen or [] for r in selection.schedule.rounds)
    assert first == [f"bert.{n}" for n in chosen]
    assert len(second) == 6 and not set(first) & set(second)
    assert set(read_manifest(out).modules) == {*first, *second}


# -- refused ---------------------------------------------------------------------------------


def _edit(art: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = _raw(art)
    change(raw)
    (art / MANIFEST_NAME).write_text(json.dumps(raw), encoding="utf-8")


def test_unknown_record_method_is_one_line(
    v1: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dec = v1("decompose")

    def unknown(raw: dict[str, Any]) -> None:
        raw["format_version"] = 2
        for record in raw["modules"].values():
            record["method"] = "mpo"
        raw["modules"][FFN1]["method"] = "tensor-train-9000"

    _edit(dec, unknown)
    for command in (["inspect", dec], ["merge", dec, "-o", tmp_path / "m"]):
        line = assert_one_line_error(
            run_cli(capsys, *command),
            1,
            f"modules.{FFN1}.method",
            "'tensor-train-9000' is not a method this mposurgeon knows",
            "upgrade mposurgeon",
        )
        assert "mpo" in line  # names the methods it knows
    assert not (tmp_path / "m").exists()


def test_format_version_3_is_refused(
    v1: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dec = v1("decompose")
    _edit(dec, lambda raw: raw.update(format_version=3))
    for command in (["inspect", dec], ["truncate", dec, "-o", tmp_path / "t", "--max-bond", "4"]):
        assert_one_line_error(
            run_cli(capsys, *command),
            1,
            "format_version 3 is newer than this mposurgeon supports (2)",
            "pip install -U mposurgeon",
        )
    assert not (tmp_path / "t").exists()
