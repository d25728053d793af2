"""The `select` stage: OPF topN selection by Fisher, magnitude or entropy scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.mpo.shapes import plan_shape
from tests.cli_runner import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
# Fast Fisher settings on MiniLM: a few short batches.
FAST = ("--max-batches", "3", "--max-length", "32", "--batch-size", "8", "-q")


@pytest.fixture
def bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert")


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 training rows, and the same rows in reverse order."""
    rows = TRAIN.read_text(encoding="utf-8").splitlines()[:16]
    folder = tmp_path_factory.mktemp("subset")
    (folder / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "reversed.jsonl").write_text("\n".join(rows[::-1]) + "\n", encoding="utf-8")
    return folder / "rows.jsonl", folder / "reversed.jsonl"


# --- Fisher on MiniLM -------------------------------------------------------------------------


def test_fisher_top2_of_ffn1_and_attention_then_decompose(
    minilm_dir: Path, tmp_path: Path, capsys
) -> None:
    sel = tmp_path / "sel"
    args = ("--top-n", "2", "--weight-types", "FFN_1,attention", "--method", "fisher")
    result = run_cli(capsys, "select", minilm_dir, "-o", sel, *args, "--data", TRAIN, *FAST)
    assert result.code == 0, result
    selection = read_manifest(sel).selection
    assert selection is not None
    chosen, patterns, scores = selection.chosen, selection.patterns, selection.scores
    # 6 layers x (FFN_1 + q, k, v, o) candidates, named as the files hold them (no `bert.`)
    with open_tensors(minilm_dir) as reader:
        keys = set(reader.keys())
    assert len(scores) == 30 and all(f"{name}.weight" in keys for name in scores)
    assert all(score > 0 and math.isfinite(score) for score in scores.values())
    assert patterns["encoder.layer.0.attention.output.dense"] == "attention.o"
    assert set(patterns.values()) == {f"attention.{p}" for p in "qkvo"} | {"FFN_1"}
    assert len(chosen) == 10 and len(set(chosen)) == 10
    for pattern in set(patterns.values()):
        mine = [n for n in chosen if patterns[n] == pattern]
        rest = [s for n, s in scores.items() if patterns[n] == pattern and n not in chosen]
        assert len(mine) == 2 and min(scores[n] for n in mine) >= max(rest)
    assert selection.data is not None and selection.data.path == str(TRAIN.resolve())
    assert len(selection.data.sha256 or "") == 64 and selection.schedule is None
    # the tensors pass through unchanged: no scoring head is saved
    assert load_file(sel / "model.safetensors").keys() == keys

    report = run_cli(capsys, "inspect", sel, "--json")
    assert json.loads(report.out)["selection"]["chosen"] == chosen
    text = run_cli(capsys, "inspect", sel)
    assert "selection (fisher, top 2 per pattern)" in text.out and text.out.count("✓") == 10

    dec = tmp_path / "dec"
    assert run_cli(capsys, "decompose", sel, "-o", dec, "-q").code == 0
    manifest = read_manifest(dec)
    assert sorted(manifest.modules) == sorted(chosen)
    assert manifest.selection == selection  # carried on for `train`


def test_fisher_scores_reproducible_and_change_only_as_expected(
    tiny_classifier_dir, subset: tuple[Path, Path], tmp_path: Path
) -> None:
    rows, reversed_rows = subset
    model = tiny_classifier_dir("bert")

    def scores(data: Path, seed: int, name: str) -> dict[str, float]:
        result = mposurgeon.select(
            model,
            output=tmp_path / name,
            top_n=1,
            weight_types=["FFN_1", "attention"],
            data=data,
            batch_size=1,  # one example per batch: the sum over batches ignores their order
            max_length=32,
            seed=seed,
        )
        return result.scores

    first = scores(rows, 0, "a")
    assert scores(rows, 0, "b") == first  # same seed: identical
    # The file's order only changes the batch order: equal up to rounding.
    reordered = scores(reversed_rows, 0, "c")
    assert reordered.keys() == first.keys()
    for name, value in first.items():
        assert reordered[name] == pytest.approx(value, rel=1e-4)
    # Another seed draws another head for the scoring model: other scores.
    other = scores(rows, 1, "d")
    assert all(other[name] != first[name] for name in first)


def test_fisher_on_an_artifact_scores_its_mpo_modules(
    tiny_classifier_dir, subset: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    model, art = tiny_classifier_dir("bert"), tmp_path / "art"
    layer = "encoder.layer.1.intermediate.dense"
    regex = layer.replace(".", r"\.")
    assert run_cli(capsys, "decompose", model, "-o", art, "--target-modules", regex).code == 0
    # (test_importance checks that an MPO layer's score is that of its dense matrix)
    sel = mposurgeon.select(
        art,
        output=tmp_path / "m",
        top_n=1,
        weight_types=["FFN_1"],
        data=subset[0],
        max_length=32,
        max_batches=2,
    )
    assert len(sel.scores) == 2 and all(s > 0 for s in sel.scores.values())
    assert len(sel.chosen) == 1
    assert read_manifest(sel.output).modules.keys() == {layer}  # the MPO passes through


# --- data-free scores: exact values -----------------------------------------------------------


def _entropy(singular_values: torch.Tensor) -> float:
    p = singular_values.double().square()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def test_magnitude_and_entropy_exact_values(bert: Path, tmp_path: Path) -> None:
    name = "encoder.layer.1.intermediate.dense"
    weight = load_file(bert / "model.safetensors")[f"{name}.weight"].double()  # (64, 32)
    mag = mposurgeon.select(bert, output=tmp_path / "m", top_n=1, method="magnitude")
    assert mag.scores[name] == pytest.approx(math.sqrt(float((weight**2).sum()) / 2048), rel=1e-12)

    ent = mposurgeon.select(bert, output=tmp_path / "e", top_n=1, method="entropy", num_cores=3)
    shape = plan_shape(64, 32, 3)
    (i1, i2, i3), (j1, j2, j3) = shape.out_modes, shape.in_modes
    assert shape.out_padding == shape.in_padding == 0
    tensor = weight.reshape(i1, i2, i3, j1, j2, j3).permute(0, 3, 1, 4, 2, 5)
    bond1 = torch.linalg.svdvals(tensor.reshape(i1 * j1, -1))
    bond2 = torch.linalg.svdvals(tensor.reshape(i1 * j1 * i2 * j2, -1))
    expected = (_entropy(bond1) + _entropy(bond2)) / 2
    assert ent.scores[name] == pytest.approx(expected, rel=1e-9)
    assert ent.selection.method == "entropy" and len(ent.scores) == 2 * 6


def test_data_free_scores_of_mpo_modules_match_their_dense_matrices(
    bert: Path, tmp_path: Path, capsys
) -> None:
    art = tmp_path / "art"
    assert run_cli(capsys, "decompose", bert, "-o", art, "-l", "FFN_1", "-n", "3", "-q").code == 0
    for method in ("magnitude", "entropy"):
        opts = dict(top_n=2, method=method, num_cores=3)
        dense = mposurgeon.select(bert, output=tmp_path / f"d-{method}", **opts).scores
        mpo = mposurgeon.select(art, output=tmp_path / f"m-{method}", **opts)
        assert mpo.scores.keys() == dense.keys()
        for name, score in dense.items():
            assert mpo.scores[name] == pytest.approx(score, rel=1e-5)
        # MPO modules may be chosen; the artifact keeps them as they are
        assert any("intermediate" in name for name in mpo.chosen)
        assert read_manifest(mpo.output).modules.keys() == read_manifest(art).modules.keys()


# --- dynamic schedule, top-n 0 ----------------------------------------------------------------


def test_dynamic_schedule(bert: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dyn"
    args = ("--top-n", "2", "--method", "magnitude", "--split-num", "2", "--epochs", "3")
    result = run_cli(capsys, "select", bert, "-o", out, *args, "--json")
    assert result.code == 0, result
    data = json.loads(result.out)
    schedule = data["schedule"]
    assert schedule["per_round"] == 1 and schedule["interval"] == 2
    assert [r["epoch"] for r in schedule["rounds"]] == [0, 2]
    assert (
        schedule["rounds"][0]["chosen"] == data["chosen"]
        and schedule["rounds"][1]["chosen"] is None
    )
    assert len(data["chosen"]) == 6  # 1 per pattern: FFN_1, FFN_2, q, k, v, o
    recorded = read_manifest(out).selection
    assert recorded is not None
    assert recorded.model_dump(mode="json") == {k: data[k] for k in recorded.model_fields_set}

    later = mposurgeon.select(
        bert, output=tmp_path / "later", top_n=2, method="magnitude", split_num=2
    )
    schedule = later.selection.schedule
    assert schedule is not None and schedule.epochs is None
    assert [r.epoch for r in schedule.rounds] == [None, None]
    assert schedule.rounds[0].chosen == data["chosen"]


def test_top_n_zero_chooses_nothing_and_decompose_says_so(bert: Path, tmp_path: Path, capsys):
    sel = mposurgeon.select(bert, output=tmp_path / "s", top_n=0, method="magnitude")
    assert sel.chosen == [] and len(sel.scores) == 12
    result = run_cli(capsys, "decompose", sel.output, "-o", tmp_path / "d")
    assert_one_line_error(result, 2, "chose no module")
    assert not (tmp_path / "d").exists()


# --- bad input: one line, nothing written -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("--top-n", "1"), 2, "--method fisher needs --data"),
        (("--top-n", "1", "--method", "magnitude", "--data", TRAIN), 2, "only read by"),
        (("--top-n", "1", "--method", "magnitude", "--weight-types", "FFN_1,FFN_3"), 2, "'FFN_3'"),
        (("--top-n", "3", "--method", "magnitude"), 2, "exceeds the 2 layers"),
        (("--top-n", "-1", "--method", "magnitude"), 2, "--top-n"),
        (("--top-n", "2", "--method", "magnitude", "--split-num", "3"), 2, "not divisible"),
        (("--top-n", "2", "--method", "entropy", "--split-num", "2", "--epochs", "1"), 2, "fit"),
        (("--top-n", "1", "--method", "cosine"), 2, "--method"),
        (("--top-n", "1", "--data", "missing.jsonl"), 4, "no such data file"),
    ],
)
def test_bad_options(bert: Path, tmp_path: Path, capsys, args: tuple, code: int, needle: str):
    out = tmp_path / "out"
    assert_one_line_error(run_cli(capsys, "select", bert, "-o", out, *args), code, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n', "bad.jsonl line 2: no text"),
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', "bad.jsonl line 2: missing 'label'"),
        ('{"text": "a", "label": 1.5}\n{"text": "b", "label": "x"}\n', "line 2: label 'x' is not"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', "bad.jsonl line 2: invalid JSON"),
        ("", "bad.jsonl holds no rows"),
    ],
)
def test_bad_data_files(bert: Path, tmp_path: Path, capsys, content: str, needle: str) -> None:
    data, out = tmp_path / "bad.jsonl", tmp_path / "out"
    data.write_text(content, encoding="utf-8")
    result = run_cli(capsys, "select", bert, "-o", out, "--top-n", "1", "--data", data)
    assert_one_line_error(result, 1, needle)
    assert not out.exists()


def test_single_label_data_is_refused(bert: Path, tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "one.jsonl", tmp_path / "out"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    result = run_cli(capsys, "select", bert, "-o", out, "--top-n", "1", "--data", data)
    assert_one_line_error(result, 2, "one.jsonl holds a single label ('x')")
    assert not out.exists()


def test_missing_model_and_existing_output(bert: Path, tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "select", tmp_path / "nope", "--top-n", "1", "-m", "magnitude")
    assert_one_line_error(result, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(capsys, "select", bert, "-o", out, "--top-n", "1", "-m", "magnitude")
    assert_one_line_error(result, 1, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
