"""Stages on hostile or careless input: bad weights, bad config.json, inconsistent manifests.

Every case is a real file edited from a tiny saved model or a decomposed artifact; each must end
in one line `error: ...` naming the tensor, field or module, the right exit code, no output
directory, and an untouched input.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest, write_manifest
from tests.cli_runner import assert_one_line_error, run_cli

TinyDir = Callable[[str], Path]
FFN = "encoder.layer.0.intermediate.dense"
FFN_WEIGHT = FFN + ".weight"


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _refused(capsys: pytest.CaptureFixture[str], source: Path, code: int, *args: object) -> str:
    """Run `mposurgeon ARGS SOURCE -o OUT`; expect one error line, no output, input unchanged."""
    out = source.parent / "out"
    before = _snapshot(source)
    result = run_cli(capsys, *args, source, "-o", out)
    line = assert_one_line_error(result, code)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]
    assert _snapshot(source) == before
    return line


@pytest.fixture
def bert(tiny_model_dir: TinyDir, tmp_path: Path) -> Path:
    """A private copy of the tiny BERT (2 layers, hidden 32, vocab 1003)."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), path)
    return path


def _set_config(model: Path, **changes: Any) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is _DELETE]:
        del config[key]
    (model / "config.json").write_text(json.dumps(config))


_DELETE = object()


def _set_tensor(model: Path, key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    tensors = load_file(model / "model.safetensors")
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


# --- decompose: weights that cannot be factorized ------------------------------------------


def test_decompose_refuses_integer_weights(capsys: pytest.CaptureFixture[str], bert: Path) -> None:
    _set_tensor(bert, FFN_WEIGHT, lambda w: (w * 100).to(torch.int32))
    line = _refused(capsys, bert, 2, "decompose")
    assert FFN_WEIGHT in line and "int32" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decompose_refuses_non_finite_weights(
    capsys: pytest.CaptureFixture[str], bert: Path, value: float
) -> None:
    def poison(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[3, 5] = value
        return w

    _set_tensor(bert, FFN_WEIGHT, poison)
    line = _refused(capsys, bert, 1, "decompose")
    assert FFN_WEIGHT in line and ("NaN" in line or "inf" in line.lower())


# --- config.json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_unreadable_config_json(
    capsys: pytest.CaptureFixture[str], bert: Path, text: str, needle: str
) -> None:
    (bert / "config.json").write_text(text)
    line = _refused(capsys, bert, 1, "decompose")
    assert "config.json" in line and needle in line


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"model_type": _DELETE}, ["config.json", "model_type"]),
        ({"model_type": "frobnicator"}, ["config.json", "model_type", "frobnicator"]),
        ({"model_type": 7}, ["config.json", "model_type"]),
        ({"hidden_size": -32}, ["config.json", "hidden_size", "-32"]),
        ({"num_hidden_layers": -2}, ["config.json", "num_hidden_layers", "-2"]),
        ({"num_hidden_layers": "two"}, ["config.json", "num_hidden_layers"]),
        ({"num_hidden_layers": 1e6}, ["config.json", "num_hidden_layers"]),
    ],
)
def test_bad_config_field(
    capsys: pytest.CaptureFixture[str], bert: Path, changes: dict[str, Any], needles: list[str]
) -> None:
    _set_config(bert, **changes)
    line = _refused(capsys, bert, 1, "decompose")
    for needle in needles:
        assert needle in line, (needle, line)


def test_huge_layer_count_fails_fast(capsys: pytest.CaptureFixture[str], bert: Path) -> None:
    _set_config(bert, num_hidden_layers=1_000_000)
    start = time.monotonic()
    line = _refused(capsys, bert, 1, "decompose")
    assert time.monotonic() - start < 20
    assert "config.json" in line and "num_hidden_layers" in line


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"num_hidden_layers": 3}, "encoder.layer.2"),  # the files hold layers 0 and 1
        ({"num_hidden_layers": 1}, "encoder.layer.1"),  # ... and the config describes one
        ({"vocab_size": 10**12}, "embeddings.word_embeddings"),
        ({"intermediate_size": 128}, FFN),
    ],
)
def test_config_disagreeing_with_weights(
    capsys: pytest.CaptureFixture[str], bert: Path, changes: dict[str, Any], needle: str
) -> None:
    _set_config(bert, **changes)
    line = _refused(capsys, bert, 1, "decompose")
    assert "config.json" in line and needle in line


def test_select_checks_config_against_weights(
    capsys: pytest.CaptureFixture[str], bert: Path
) -> None:
    _set_config(bert, num_hidden_layers=1_000_000)
    line = _refused(capsys, bert, 1, "select", "--top-n", "1", "-m", "magnitude")
    assert "num_hidden_layers" in line


@pytest.mark.parametrize("case", ["int32", "nan", "config"])
def test_inspect_of_faulty_inputs(
    capsys: pytest.CaptureFixture[str], bert: Path, case: str
) -> None:
    if case == "int32":
        _set_tensor(bert, FFN_WEIGHT, lambda w: w.to(torch.int32))
    elif case == "nan":
        _set_tensor(bert, FFN_WEIGHT, lambda w: w * float("nan"))
    else:
        (bert / "config.json").write_text("[]")
    for args in ([], ["--json"]):
        result = run_cli(capsys, "inspect", bert, *args)
        assert result.code == 0, result


# --- artifacts whose manifest disagrees with its tensors -----------------------------------


@pytest.fixture(scope="module")
def bert_mpo(tiny_model_dir: TinyDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "decomposed"
    mposurgeon.decompose(tiny_model_dir("bert"), output=out, layers=["FFN_1", "FFN_2"])
    return out


def _mutated(artifact: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of `artifact` whose manifest `change` edited (the manifest is not checksummed
    itself, so the files stay valid and only the edit is wrong)."""
    path = tmp_path / "artifact"
    shutil.copytree(artifact, path)
    data = json.loads((path / "mposurgeon.json").read_text())
    change(data)
    (path / "mposurgeon.json").write_text(json.dumps(data, indent=2))
    return path


def _rekey(data: dict[str, Any]) -> None:
    data["modules"]["encoder.layer.0.other"] = data["modules"].pop(FFN)


def _ghost(data: dict[str, Any]) -> None:
    ghost = dict(data["modules"][FFN], name="encoder.layer.0.ghost")
    ghost["weight_key"] = "encoder.layer.0.ghost.weight"
    data["modules"]["encoder.layer.0.ghost"] = ghost


def _bonds(data: dict[str, Any]) -> None:
    data["modules"][FFN]["bonds"][1] += 1


def _conv1d(data: dict[str, Any]) -> None:
    rec = data["modules"][FFN]
    rec["kind"] = "conv1d"
    rec["shape"] = rec["shape"][::-1]


def _dtype(value: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["modules"][FFN]["dtype"] = value

    return change


def _drop(data: dict[str, Any]) -> None:
    del data["modules"][FFN]


MANIFEST_FAULTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "key-differs-from-name": (_rekey, "encoder.layer.0.other"),
    "module-without-cores": (_ghost, "encoder.layer.0.ghost"),
    "bonds-differ-from-cores": (_bonds, FFN),
    "unknown-dtype": (_dtype("foo"), FFN),
    "integer-dtype": (_dtype("int8"), FFN),
    "cores-of-no-module": (_drop, FFN),
}


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
@pytest.mark.parametrize("stage", ["truncate", "merge", "decompose"])
def test_manifest_disagreeing_with_tensors(
    capsys: pytest.CaptureFixture[str], bert_mpo: Path, tmp_path: Path, fault: str, stage: str
) -> None:
    change, needle = MANIFEST_FAULTS[fault]
    artifact = _mutated(bert_mpo, tmp_path, change)
    args = {
        "truncate": ["truncate", "--max-bond", "2"],
        "merge": ["merge"],
        "decompose": ["decompose", "--layers", "attention"],
    }[stage]
    line = _refused(capsys, artifact, 1, *args)
    assert needle in line and "mposurgeon.json" in line


def test_merge_refuses_a_kind_the_model_does_not_have(
    capsys: pytest.CaptureFixture[str], bert_mpo: Path, tmp_path: Path
) -> None:
    artifact = _mutated(bert_mpo, tmp_path, _conv1d)
    line = _refused(capsys, artifact, 1, "merge")
    assert FFN in line and "conv1d" in line and "linear" in line


def test_merge_counts_what_it_merged(
    capsys: pytest.CaptureFixture[str], bert_mpo: Path, tmp_path: Path
) -> None:
    result = mposurgeon.merge(bert_mpo, output=tmp_path / "dense")
    assert result.merged_modules == 4
    assert not any(".mpo." in k for k in load_file(tmp_path / "dense" / "model.safetensors"))


def _with_tensors(
    artifact: Path, tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], None]
) -> Path:
    """A copy of `artifact` whose tensors `change` edited, its checksums written anew."""
    path = tmp_path / "artifact"
    shutil.copytree(artifact, path)
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    write_manifest(path, read_manifest(path))
    return path


def _nan_core(tensors: dict[str, torch.Tensor]) -> None:
    core = tensors[FFN + ".mpo.core.1"].clone()
    core.view(-1)[0] = float("nan")
    tensors[FFN + ".mpo.core.1"] = core


def _dense_too(tensors: dict[str, torch.Tensor]) -> None:
    tensors[FFN_WEIGHT] = torch.zeros(64, 32)


TENSOR_FAULTS = {"nan-core": (_nan_core, FFN + ".mpo.core.1"), "dense-too": (_dense_too, FFN)}


@pytest.mark.parametrize("fault", list(TENSOR_FAULTS))
@pytest.mark.parametrize("stage", ["truncate", "merge"])
def test_tensors_disagreeing_with_manifest(
    capsys: pytest.CaptureFixture[str], bert_mpo: Path, tmp_path: Path, fault: str, stage: str
) -> None:
    change, needle = TENSOR_FAULTS[fault]
    artifact = _with_tensors(bert_mpo, tmp_path, change)
    args = ["truncate", "--max-bond", "2"] if stage == "truncate" else ["merge"]
    line = _refused(capsys, artifact, 1, *args)
    assert needle in line


def test_inspect_plot_of_nan_cores(
    capsys: pytest.CaptureFixture[str], bert_mpo: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    artifact = _with_tensors(bert_mpo, tmp_path, _nan_core)
    result = run_cli(capsys, "inspect", artifact, "--plot", tmp_path / "spectra.png")
    assert_one_line_error(result, 1, FFN + ".mpo.core.1")
    assert not (tmp_path / "spectra.png").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_record_cores_refuses_any_non_finite_entry(dtype: torch.dtype, bad: float) -> None:
    """`record_cores`' one-pass check (min and max) sees a single NaN or infinity anywhere."""
    from mposurgeon.errors import ArtifactError
    from mposurgeon.methods.mpo.record import MPORecord
    from mposurgeon.methods.mpo.state import record_cores

    rec = MPORecord(
        name="m", kind="linear", weight_key="m.weight", shape=[4, 6], dtype="float32",
        out_dim=4, in_dim=6, out_modes=[2, 2], in_modes=[2, 3], out_padding=0, in_padding=0,
        bonds=[1, 4, 1], central_index=0, params=40, dense_params=24,
    )  # fmt: skip
    cores = {k: torch.randn(s, generator=torch.Generator().manual_seed(0)).to(dtype)
             for k, s in rec.tensor_shapes().items()}  # fmt: skip
    assert len(record_cores(rec, cores)) == 2
    for position in (0, 11):  # the first entry of a core, and one inside
        broken = dict(cores)
        key = rec.core_keys()[1]
        broken[key] = cores[key].clone()
        broken[key].view(-1)[position] = bad
        with pytest.raises(ArtifactError, match="NaN or infinite"):
            record_cores(rec, broken)
