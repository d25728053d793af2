"""The manifest: schema, lineage, versions, checksums (mposurgeon.artifact.manifest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mposurgeon._version import __version__
from mposurgeon.artifact.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    BackgroundChecksums,
    BaseInfo,
    Manifest,
    load_artifact,
    manifest_sha256,
    new_manifest,
    read_manifest,
    verify_files,
    write_manifest,
)
from mposurgeon.artifact.store import HashCancelled
from mposurgeon.artifact.tensors import ShardedWriter
from mposurgeon.errors import ArtifactError
from mposurgeon.methods.mpo.record import MPORecord


def _record(**changes: Any) -> MPORecord:
    fields: dict[str, Any] = dict(
        name="encoder.layer.0.intermediate.dense",
        kind="linear",
        weight_key="encoder.layer.0.intermediate.dense.weight",
        shape=[64, 30],
        dtype="float32",
        out_dim=64,
        in_dim=30,
        out_modes=[4, 4, 4],
        in_modes=[2, 4, 4],
        out_padding=0,
        in_padding=2,
        bonds=[1, 8, 8, 1],
        central_index=1,
        trainable=[1],
        rel_error=1e-6,
        predicted_error=2e-6,
        params=1000,
        dense_params=1920,
        entropy=[1.5, 1.2],
    )
    fields.update(changes)
    return MPORecord(**fields)


def _base() -> BaseInfo:
    return BaseInfo(name="tiny-bert", model_id=None, revision=None, path="/models/tiny-bert")


def _artifact(directory: Path, stage: str = "decompose", parent: Path | None = None) -> Manifest:
    """Write a small artifact (weights + config + manifest) into `directory`."""
    directory.mkdir(parents=True)
    with ShardedWriter(directory, 10**6) as writer:
        for k, shape in enumerate([(1, 4, 2, 8), (8, 4, 4, 8), (8, 4, 4, 1)]):  # as _record()
            writer.add(f"encoder.layer.0.intermediate.dense.mpo.core.{k}", torch.randn(shape))
        writer.add("encoder.layer.0.intermediate.dense.bias", torch.zeros(64))
    (directory / "config.json").write_text('{"model_type": "bert"}')
    parent_manifest = read_manifest(parent) if parent else None
    manifest = new_manifest(
        stage=stage,
        options={"num_cores": 3, "out": Path("/tmp/x")},
        base=_base(),
        parent_manifest=parent_manifest,
        parent_path=parent,
        modules=[_record()],
    )
    write_manifest(directory, manifest)
    return manifest


def test_round_trip(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    written = _artifact(art)
    assert set(written.files) == {"config.json", "model.safetensors"}
    raw = json.loads((art / MANIFEST_NAME).read_text())
    assert raw["format"] == FORMAT == "mposurgeon-artifact"
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert raw["modules"]["encoder.layer.0.intermediate.dense"]["method"] == "mpo"
    assert raw["options"]["out"] == "/tmp/x"  # paths serialize as strings
    assert raw["created_at"].endswith("Z")
    assert (art / MANIFEST_NAME).read_text().startswith('{\n  "')  # indent 2
    manifest = load_artifact(art)
    assert manifest.stage == "decompose"
    assert manifest.tool_version == __version__
    assert manifest.parent is None
    assert [e.stage for e in manifest.lineage] == ["decompose"]
    assert manifest.modules["encoder.layer.0.intermediate.dense"] == _record()
    assert manifest.files == written.files


def test_lineage_chains_parents(tmp_path: Path) -> None:
    _artifact(tmp_path / "v1")
    second = _artifact(tmp_path / "v2", stage="truncate", parent=tmp_path / "v1")
    assert second.parent is not None
    assert second.parent.stage == "decompose"
    assert second.parent.manifest_sha256 == manifest_sha256(tmp_path / "v1")
    assert [e.stage for e in second.lineage] == ["decompose", "truncate"]
    assert second.lineage[-1].parent_manifest_sha256 == second.parent.manifest_sha256
    assert second.lineage[0].parent_manifest_sha256 is None
    assert read_manifest(tmp_path / "v2").lineage == second.lineage


def test_tampered_file_is_named(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    path = art / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors does not match its checksum"):
        load_artifact(art)
    load_artifact(art, verify=False)  # --no-verify skips hashing


def _tampered(art: Path) -> None:
    path = art / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_background_checksums_report_in_the_waiting_thread(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    check = BackgroundChecksums(art, load_artifact(art, verify=False))
    check.start()
    check.start()  # idempotent
    check.wait()
    _tampered(art)
    check = BackgroundChecksums(art, load_artifact(art, verify=False))
    check.start()
    with pytest.raises(ArtifactError, match=r"model\.safetensors does not match its checksum"):
        check.wait()


def test_background_checksums_never_started_run_inline(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    _tampered(art)
    check = BackgroundChecksums(art, load_artifact(art, verify=False))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        check.wait()


def test_cancelled_background_checksums_do_not_pass(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    check = BackgroundChecksums(art, load_artifact(art, verify=False))
    check.cancel()  # before it starts: it stops at its first chunk
    check.start()
    with pytest.raises(HashCancelled):
        check.wait()


def test_missing_listed_file(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    (art / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config\.json is listed .* but missing"):
        load_artifact(art)


def test_unlisted_tensor_file(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    manifest = _artifact(art)
    (art / "model-extra.safetensors").write_bytes(b"sneaky")
    with pytest.raises(ArtifactError, match=r"model-extra\.safetensors is not listed"):
        verify_files(art, manifest)
    (art / "model-extra.safetensors").unlink()
    (art / "notes.txt").write_text("not a tensor file: tolerated")
    verify_files(art, manifest)


def _rewrite(art: Path, change: dict[str, Any]) -> None:
    data = json.loads((art / MANIFEST_NAME).read_text())
    data.update(change)
    (art / MANIFEST_NAME).write_text(json.dumps(data))


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    _rewrite(art, {"format_version": 7, "modules": "whatever a future schema holds"})
    with pytest.raises(ArtifactError) as info:
        read_manifest(art)
    assert str(info.value) == (
        "artifact format_version 7 is newer than this mposurgeon supports (2)"
    )
    assert info.value.hint == "upgrade mposurgeon: pip install -U mposurgeon"


def test_invalid_json(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    (art / MANIFEST_NAME).write_text('{"format": "mposurgeon-artifact",')
    with pytest.raises(ArtifactError, match=r"mposurgeon\.json is not valid JSON") as info:
        read_manifest(art)
    assert "\n" not in str(info.value)


def test_schema_error_names_the_field(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    data = json.loads((art / MANIFEST_NAME).read_text())
    data["modules"]["encoder.layer.0.intermediate.dense"]["bonds"] = "eight"
    (art / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"mposurgeon\.json .*modules\..*\.bonds"):
        read_manifest(art)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no mposurgeon.json"):
        read_manifest(tmp_path)
    art = tmp_path / "v1"
    _artifact(art)
    _rewrite(art, {"format": "something-else"})
    with pytest.raises(ArtifactError, match="something-else"):
        read_manifest(art)


def test_unknown_extra_fields_are_kept(tmp_path: Path) -> None:
    art = tmp_path / "v1"
    _artifact(art)
    _rewrite(art, {"future_field": {"x": 1}})
    manifest = read_manifest(art)
    assert manifest.model_extra == {"future_field": {"x": 1}}


@pytest.mark.parametrize(
    "change",
    [
        {"bonds": [1, 8, 1]},  # one bond short
        {"in_modes": [2, 4]},  # modes of different lengths
        {"central_index": 3},
        {"trainable": [5]},
        {"in_padding": 0},  # modes no longer cover the padded dimension
        {"shape": [64, 31]},
        {"kind": "conv2d"},
    ],
)
def test_module_record_is_validated(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _record(**change)


def test_verified_input_abandons_hashing_on_ctrl_c(tmp_path: Path) -> None:
    from mposurgeon.stages.common import StageOptions, open_input, verified_input

    art = tmp_path / "v1"
    _artifact(art)
    inp = open_input(art, StageOptions(), defer_checksums=True)
    assert inp.checksum_check is not None
    with pytest.raises(KeyboardInterrupt), verified_input(inp):
        raise KeyboardInterrupt
    assert inp.checksum_check._cancel.is_set()
    ok = open_input(art, StageOptions(), defer_checksums=True)
    with verified_input(ok):
        pass  # an intact input passes on the way out
    assert (
        open_input(art, StageOptions(verify_checksums=False), defer_checksums=True).checksum_check
        is None
    )
