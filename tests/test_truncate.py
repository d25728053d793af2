"""The truncate stage and command: targets, errors, perturbed cores, merge, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest, write_manifest
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.methods.mpo.record import core_key
from mposurgeon.mpo import MPOShape, decompose, modes_of, relative_error, to_matrix
from tests.cli_runner import assert_one_line_error, run_cli

LAYERS = ["FFN_1", "FFN_2", "attention"]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _matrices(artifact: Path) -> dict[str, torch.Tensor]:
    """Every MPO module's matrix, contracted in float64."""
    manifest = read_manifest(artifact)
    out = {}
    with open_tensors(artifact) as reader:
        for name, rec in manifest.modules.items():
            cores = [reader.get(key).double() for key in rec.core_keys()]
            out[name] = to_matrix(cores, rec.mpo_shape)
    return out


def _stored_mpo_params(artifact: Path) -> int:
    """Elements of every core in the safetensors file (read from its header)."""
    manifest = read_manifest(artifact)
    with safe_open(artifact / "model.safetensors", "pt") as f:
        return sum(
            math.prod(f.get_slice(core_key(name, k)).get_shape())
            for name, rec in manifest.modules.items()
            for k in range(len(rec.out_modes))
        )


# --- MiniLM: real weights -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_mpo(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("truncate-minilm") / "decomposed"
    mposurgeon.decompose(minilm_dir, output=out, layers=LAYERS)
    return out


@pytest.fixture(scope="module")
def minilm_half(minilm_mpo: Path) -> Path:
    out = minilm_mpo.parent / "half"
    mposurgeon.truncate(minilm_mpo, output=out, param_ratio=0.5)
    return out


def test_rel_tol_keeps_every_measured_error_within_the_tolerance(minilm_mpo: Path) -> None:
    out = minilm_mpo.parent / "tol"
    result = mposurgeon.truncate(minilm_mpo, output=out, rel_tol=0.3)
    manifest = read_manifest(out)
    assert len(manifest.modules) == 36 and len(result.truncated) == 36
    before = read_manifest(minilm_mpo).modules
    for name, rec in manifest.modules.items():
        assert rec.rel_error is not None and rec.predicted_error is not None
        assert rec.rel_error <= rec.predicted_error + 1e-6 and rec.predicted_error <= 0.3, name
        assert rec.params < before[name].params
        assert rec.truncated_from == before[name].bonds  # type: ignore[attr-defined]
        assert len(rec.entropy) == len(rec.bonds) - 2
    # the recorded measured error is the real one, relative to the input MPO
    old, new = _matrices(minilm_mpo), _matrices(out)
    for name in list(manifest.modules)[:4]:
        assert relative_error(old[name], new[name]) == pytest.approx(
            manifest.modules[name].rel_error, rel=1e-6
        )
    assert result.params_after < result.params_before
    assert [e.stage for e in manifest.lineage] == ["decompose", "truncate"]
    assert manifest.parent is not None and manifest.parent.path == str(minilm_mpo)


def test_param_ratio_hits_the_target_within_one_percent(minilm_mpo: Path, minilm_half: Path):
    before = sum(r.params for r in read_manifest(minilm_mpo).modules.values())
    after = sum(r.params for r in read_manifest(minilm_half).modules.values())
    assert abs(after / before - 0.5) <= 0.01
    assert _stored_mpo_params(minilm_half) == after  # the manifest counts what the file holds


def test_merge_of_a_truncated_artifact_gives_its_matrices(minilm_half: Path) -> None:
    merged = minilm_half.parent / "merged"
    mposurgeon.merge(minilm_half, output=merged)
    expected = _matrices(minilm_half)
    manifest = read_manifest(minilm_half)
    with safe_open(merged / "model.safetensors", "pt") as f:
        for name, matrix in expected.items():
            weight = f.get_tensor(manifest.modules[name].weight_key)
            torch.testing.assert_close(weight.double(), matrix, rtol=0, atol=1e-5)


# --- tiny model: exact checks and the command line ------------------------------------------


@pytest.fixture(scope="module")
def tiny_dec(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("truncate-tiny") / "art"
    mposurgeon.decompose(tiny_model_dir("bert"), output=out, num_cores=3)
    return out


@pytest.fixture
def tiny_art(tiny_dec: Path, tmp_path: Path) -> Path:
    """A private copy of the decomposed tiny BERT (tests may tamper with it)."""
    return Path(shutil.copytree(tiny_dec, tmp_path / "art"))


def test_single_cut_bond_measured_error_equals_predicted(tiny_art: Path, tmp_path, capsys):
    out = tmp_path / "cut"
    # bonds are (4, 16) and (8, 16): a cap of 10 cuts only the second bond of every module
    result = run_cli(capsys, "truncate", tiny_art, "-o", out, "--max-bond", "10", "--json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["truncated_modules"] == 12 and data["output"] == str(out)
    for rec in read_manifest(out).modules.values():
        assert rec.bonds[2] == 10 and rec.bonds[1] == rec.truncated_from[1]  # type: ignore[attr-defined]
        assert rec.predicted_error > 0.01
        assert abs(rec.rel_error - rec.predicted_error) < 1e-6


def test_bond_pattern_alone_and_with_a_target(tiny_art: Path, tmp_path: Path) -> None:
    only = mposurgeon.truncate(
        tiny_art, output=tmp_path / "p", bond_pattern=[r".*layer\.0\.attention\.self\.query=3"]
    )
    changed = {m.name: m.bonds for m in only.modules if m.changed}
    assert changed == {"encoder.layer.0.attention.self.query": (1, 3, 3, 1)}
    both = mposurgeon.truncate(
        tiny_art,
        output=tmp_path / "q",
        param_ratio=0.6,
        bond_pattern={r".*intermediate.*": 2},
    )
    assert all(max(m.bonds) == 2 for m in both.modules if "intermediate" in m.name)
    assert abs(both.params_after / both.params_before - 0.6) <= 0.01
    rules = {m.rule for m in both.modules}
    assert rules == {r".*intermediate.*=2", "param_ratio=0.6"}


def _rewrite_cores(src: Path, dst: Path, change) -> None:
    """Copy artifact `src` to `dst` with every module's cores replaced by change(cores)."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    with open_tensors(dst) as reader:
        tensors = {key: reader.get(key).clone() for key in reader.keys()}
    for name, rec in manifest.modules.items():
        keys = [core_key(name, k) for k in range(len(rec.out_modes))]
        for key, core in zip(keys, change([tensors[k].double() for k in keys]), strict=True):
            tensors[key] = core.float().contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(dst, manifest)


def _gauge(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = list(cores)
    for k in range(len(out) - 1):
        r = out[k].shape[3]
        g = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(
            r, r, generator=gen, dtype=torch.float64
        )
        out[k] = torch.tensordot(out[k], g, dims=1)
        out[k + 1] = torch.tensordot(torch.linalg.inv(g), out[k + 1], dims=1)
    return out


def _canonical(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fresh TT-SVD (canonical form) of the matrix the cores represent."""
    out_modes, in_modes = modes_of(cores)
    shape = MPOShape(math.prod(out_modes), math.prod(in_modes), out_modes, in_modes)
    return decompose(to_matrix(cores, shape), shape).cores


def test_perturbed_cores_truncate_like_canonical_cores(tiny_art: Path, tmp_path: Path) -> None:
    perturbed, canonical = tmp_path / "perturbed", tmp_path / "canonical"
    _rewrite_cores(tiny_art, perturbed, _gauge)
    _rewrite_cores(perturbed, canonical, _canonical)
    before = _matrices(perturbed)
    for name, matrix in _matrices(canonical).items():
        assert relative_error(before[name], matrix) < 1e-6
    for kwargs in ({"max_bond": 3}, {"param_ratio": 0.4}, {"rel_tol": 0.5}):
        a = mposurgeon.truncate(perturbed, output=tmp_path / "a", overwrite=True, **kwargs)
        b = mposurgeon.truncate(canonical, output=tmp_path / "b", overwrite=True, **kwargs)
        assert [m.bonds for m in a.modules] == [m.bonds for m in b.modules]
        ma, mb = _matrices(tmp_path / "a"), _matrices(tmp_path / "b")
        # float32 cuts of matrices 5e-7 apart: a cut moves by the input's change over the
        # relative spectral gap at the cut (3e-5 here; 1e-3 on flat random spectra, float64)
        for name in ma:
            assert relative_error(mb[name], ma[name]) < 1e-4, (kwargs, name)


def test_dry_run_plans_and_writes_nothing(tiny_art: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    table = run_cli(capsys, "truncate", tiny_art, "-o", out, "--param-ratio", "0.5", "--dry-run")
    assert table.code == 0, table
    assert "planned truncation (dry run" in table.out and "predicted error" in table.out
    data = json.loads(
        run_cli(
            capsys, "truncate", tiny_art, "-o", out, "--param-ratio", "0.5", "--dry-run", "--json"
        ).out
    )
    assert data["dry_run"] is True and data["output"] is None and data["max_rel_error"] is None
    assert abs(data["truncation"]["ratio"] - 0.5) <= 0.01
    assert all(m["rel_error"] is None for m in data["modules"])
    _nothing_written(out)


def test_summary_line_then_merge_verify(tiny_art: Path, tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "truncate", tiny_art, "-o", tmp_path / "o", "--rel-tol", "0.4", "-q")
    assert result.code == 0, result
    assert "truncated 12 of 12 MPO modules (--rel-tol 0.4)" in result.out
    assert "largest measured error" in result.out and "wrote" in result.out
    # the factorized model (MPO layers with the new bonds) and its merge give the same outputs
    merged = run_cli(capsys, "merge", tmp_path / "o", "-o", tmp_path / "m", "--verify", "-q")
    assert merged.code == 0 and "verify: OK" in merged.out, merged


# --- bad input: one line, exit code, nothing written ----------------------------------------


def test_artifact_without_mpo_modules(tiny_art: Path, tmp_path: Path, capsys) -> None:
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", tiny_art, "-o", merged, "-q").code == 0
    out = tmp_path / "o"
    assert_one_line_error(
        run_cli(capsys, "truncate", merged, "-o", out, "--max-bond", "2"),
        2,
        "no MPO modules",
        "decompose",
    )
    _nothing_written(out)


def test_plain_checkpoint_is_refused(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    result = run_cli(capsys, "truncate", tiny_model_dir("bert"), "-o", out, "--max-bond", "2")
    assert_one_line_error(result, 2, "not a mposurgeon artifact", "decompose")
    _nothing_written(out)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--max-bond", "16"], ["--max-bond 16 would not lower any bond", "largest is 16"]),
        (
            ["--bond-pattern", r".*layer\.0\.attention\.self\.key=20"],
            ["would not lower encoder.layer.0.attention.self.key", "16"],
        ),
        (["--max-bond", "4", "--rel-tol", "0.1"], ["--max-bond, --rel-tol", "only one"]),
        ([], ["--max-bond N, --rel-tol X or --param-ratio R"]),
        (["--param-ratio", "1.5"], ["param-ratio"]),
        (["--param-ratio", "0.001"], ["out of reach"]),
        (["--bond-pattern", "pooler.*=2"], ["matches no MPO module", "encoder.layer.0"]),
        (["--bond-pattern", "enc(oder=2"], ["bad regex"]),
        (["--bond-pattern", "encoder"], ["expected REGEX=N"]),
    ],
)
def test_bad_options_are_usage_errors(tiny_art: Path, tmp_path: Path, capsys, args, needles):
    out = tmp_path / "o"
    before = _snapshot(tiny_art)
    assert_one_line_error(run_cli(capsys, "truncate", tiny_art, "-o", out, *args), 2, *needles)
    _nothing_written(out)
    assert _snapshot(tiny_art) == before


def test_missing_path(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    result = run_cli(capsys, "truncate", tmp_path / "nope", "-o", out, "--max-bond", "2")
    assert_one_line_error(result, 4, "nope")
    _nothing_written(out)


def test_existing_output_is_untouched(tiny_art: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli(capsys, "truncate", tiny_art, "-o", out, "--max-bond", "2")
    assert_one_line_error(result, 1, "taken", "--overwrite")
    assert _snapshot(out) == {"precious.txt": b"keep me"}


def test_tampered_artifact_is_refused(tiny_art: Path, tmp_path: Path, capsys) -> None:
    weights = tiny_art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "o"
    result = run_cli(capsys, "truncate", tiny_art, "-o", out, "--max-bond", "2")
    assert_one_line_error(result, 1, "model.safetensors", "checksum")
    _nothing_written(out)
