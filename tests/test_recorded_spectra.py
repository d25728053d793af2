"""decompose records the bond spectra of a module it cut nothing from; truncate plans from
them while the cores are the ones they were recorded for, and from the cores otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest, write_manifest
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import ArtifactError
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import record_spectra
from mposurgeon.models.layers import cores_fingerprint
from mposurgeon.mpo.decomposition import bond_spectra, gram_spectra
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import build_tiny_model


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    with open_tensors(artifact) as reader:
        return {key: reader.get(key).clone() for key in reader.keys()}


def _mpo_records(artifact: Path) -> dict[str, MPORecord]:
    return {
        name: rec
        for name, rec in read_manifest(artifact).modules.items()
        if isinstance(rec, MPORecord)
    }


@pytest.fixture(scope="module")
def dec(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spectra") / "dec"
    mposurgeon.decompose(tiny_model_dir("llama"), output=out)
    return out


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`src` copied to `dst` with its tensor file replaced by `tensors` (manifest rewritten,
    so that its checksums describe the new file)."""
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(dst, read_manifest(dst))


def test_lossless_decompose_records_the_exact_spectra(dec: Path) -> None:
    tensors = _tensors(dec)
    records = _mpo_records(dec)
    assert records and all(rec.spectra is not None for rec in records.values())
    for rec in records.values():
        cores = [tensors[key] for key in rec.core_keys()]
        assert rec.spectra is not None
        assert rec.spectra.cores_sha256 == cores_fingerprint(cores)
        recorded = record_spectra(rec, tensors, cores)
        assert recorded is not None
        exact = bond_spectra(cores)
        assert [len(s) for s in recorded] == [len(s) for s in exact] == rec.bonds[1:-1]
        for got, want in zip(recorded, exact, strict=True):  # float32 Grams: ~1e-7 s_max^2
            assert float((got.square() - want.square()).abs().max()) <= 1e-6 * float(want[0]) ** 2


@pytest.mark.parametrize("options", [{"max_bond": 4}, {"rel_tol": 0.3}, {"dtype": "keep"}], ids=str)
def test_no_spectra_where_decompose_cut_or_rounded(
    tiny_model_dir, tmp_path: Path, options: dict
) -> None:
    model = tiny_model_dir("llama")
    if options.get("dtype") == "keep":  # bfloat16 weights into bfloat16 cores
        model = build_tiny_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    out = tmp_path / "dec"
    mposurgeon.decompose(model, output=out, **options)
    records = _mpo_records(out)
    cut = [rec for rec in records.values() if rec.predicted_error]
    if "dtype" not in options:  # nothing is recorded for a module that was cut
        assert cut and all(rec.spectra is None for rec in cut)
    else:  # half-precision cores: no module records spectra
        assert all(rec.spectra is None for rec in records.values())
    recorded = {f"{n}.mpo.spectra" for n, rec in records.items() if rec.spectra is not None}
    assert {key for key in _tensors(out) if key.endswith(".mpo.spectra")} == recorded


def test_truncate_drops_the_spectra_of_the_modules_it_cuts(dec: Path, tmp_path: Path) -> None:
    out = tmp_path / "cut"
    mposurgeon.truncate(dec, output=out, bond_pattern=[r".*\.mlp\.down_proj=2"])
    before, after = _mpo_records(dec), _mpo_records(out)
    keys = set(_tensors(out))
    cut = [name for name in after if after[name].bonds != before[name].bonds]
    kept = [name for name in after if name not in cut]
    assert cut and kept
    assert all(after[n].spectra is None and f"{n}.mpo.spectra" not in keys for n in cut)
    assert all(after[n].spectra == before[n].spectra and f"{n}.mpo.spectra" in keys for n in kept)
    merged = tmp_path / "merged"
    mposurgeon.merge(out, output=merged)  # a plain checkpoint: no spectra
    assert not [key for key in _tensors(merged) if "spectra" in key]


def test_stale_spectra_are_ignored(
    dec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cores changed under a record that kept its spectra (a stage that forgot to drop them):
    the fingerprint no longer matches, so truncate computes that module's spectra."""
    tensors = _tensors(dec)
    name, rec = next(iter(_mpo_records(dec).items()))
    key = rec.core_keys()[0]
    tensors[key] = (tensors[key] * 1.5).contiguous()
    stale = tmp_path / "stale"
    _rewrite(dec, stale, tensors)
    computed: list[int] = []

    def counting(cores: list[torch.Tensor]) -> list[torch.Tensor]:
        computed.append(len(cores))
        return gram_spectra(cores)

    monkeypatch.setattr("mposurgeon.stages.truncate.gram_spectra", counting)
    result = mposurgeon.truncate(stale, param_ratio=0.5, dry_run=True)
    assert len(computed) == 1  # only the changed module's
    cores = [tensors[k] for k in rec.core_keys()]
    assert record_spectra(rec, tensors, cores) is None
    planned = next(m for m in result.modules if m.name == name)
    exact = bond_spectra(cores)
    assert planned.params_before == rec.params and len(exact) == len(rec.bonds) - 2


def test_damaged_spectra_fail_with_one_line(
    dec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = _tensors(dec)
    name, rec = next(iter(_mpo_records(dec).items()))
    (key,) = rec.spectra_keys()
    tensors[key] = tensors[key].float()  # float32, where the record says float64
    damaged = tmp_path / "damaged"
    _rewrite(dec, damaged, tensors)
    with pytest.raises(ArtifactError, match=f"recorded spectra of {name}"):
        record_spectra(rec, tensors, [tensors[k] for k in rec.core_keys()])
    out = tmp_path / "never"
    result = run_cli(capsys, "truncate", damaged, "-o", out, "--param-ratio", "0.5")
    assert_one_line_error(result, 1, "recorded spectra")
    assert not out.exists()
