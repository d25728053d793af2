"""The scale suite's rows and goals, computed from given measurements (no stage is run)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.__main__ import markdown
from benchmarks.bench_memory import peak_row
from benchmarks.bench_scale import (
    CONTRACT,
    COPY,
    COPY_TRUNCATED,
    DECOMPOSE,
    MERGE,
    MERGE_TRUNCATED,
    TRUNCATE,
    same_peak_rows,
    steps,
    time_rows,
)


def _m(seconds: float, private_mb: float = 100.0, capped: bool = False) -> dict[str, Any]:
    """A `measure` result."""
    m: dict[str, Any] = {"capped": capped, "seconds": seconds, "private_mb": private_mb}
    if not capped:
        m["resident_mb"] = private_mb + 50.0
    return m


def test_time_rows_compare_truncate_to_decompose_and_merges_to_copies() -> None:
    found = {
        DECOMPOSE: _m(10.0),
        TRUNCATE: _m(12.0),
        MERGE: _m(3.0),
        COPY: _m(2.0),
        CONTRACT: _m(1.0),
        MERGE_TRUNCATED: _m(4.0),
        COPY_TRUNCATED: _m(1.6),
    }
    truncate, merge, contract, merge_truncated = time_rows(found, "8 layers")
    assert truncate["ratio"] == pytest.approx(1.2) and truncate["goal"] == 1.0
    assert truncate["value"] == "12.0 s" and truncate["baseline"] == "decompose 10.0 s"
    assert merge["ratio"] == pytest.approx(1.5) and merge["goal"] == 1.5
    assert "copy of the decomposition 2.0 s" in merge["baseline"]
    assert contract["ratio"] == pytest.approx(0.5) and contract["goal"] is None  # the floor
    assert contract["stage"] == CONTRACT and "copy of the decomposition" in contract["baseline"]
    assert merge_truncated["ratio"] == pytest.approx(2.5) and merge_truncated["goal"] == 1.5
    assert merge_truncated["baseline"] == "shard-by-shard safetensors copy of it 1.6 s"
    assert all("8 layers" in row["benchmark"] for row in (truncate, merge, merge_truncated))


def test_time_rows_without_a_ratio_when_a_stage_was_killed() -> None:
    found = {DECOMPOSE: _m(30.0, capped=True)}  # nothing read its output
    rows = time_rows(found, "22 layers")
    assert len(rows) == 4 and all(row["ratio"] is None for row in rows)
    assert rows[0]["value"] == "not run (the stage making its input was killed)"
    assert rows[0]["baseline"] == "decompose killed after 30 s"
    found = {DECOMPOSE: _m(10.0), TRUNCATE: _m(50.0, capped=True), MERGE: _m(1.0), COPY: _m(1.0)}
    truncate, merge, _, merge_truncated = time_rows(found, "22 layers")
    assert truncate["ratio"] is None and truncate["value"] == "killed after 50 s"
    assert merge["ratio"] == pytest.approx(1.0) and merge_truncated["ratio"] is None


def test_same_peak_rows_compare_the_most_layers_to_the_fewest() -> None:
    by_layers = {
        8: {
            DECOMPOSE: _m(1.0, 600.0),
            MERGE: _m(1.0, 500.0),
            TRUNCATE: _m(1.0, 700.0),
            COPY: _m(1.0, 20.0),
            CONTRACT: _m(1.0, 90.0),
        },
        22: {
            DECOMPOSE: _m(1.0, 660.0),
            MERGE: _m(1.0, 1500.0, capped=True),
            COPY: _m(1.0, 30.0),
            CONTRACT: _m(1.0, 95.0),
        },
        15: {DECOMPOSE: _m(1.0, 1.0)},  # neither the fewest nor the most: not compared
    }
    rows = {row["stage"]: row for row in same_peak_rows(by_layers, "cpu")}
    assert set(rows) == {DECOMPOSE, MERGE}  # no truncate at 22 layers; copy, contraction: baselines
    assert rows[DECOMPOSE]["ratio"] == pytest.approx(1.1) and rows[DECOMPOSE]["goal"] == 1.1
    assert "22 vs 15 layers" not in rows[DECOMPOSE]["benchmark"]
    assert "22 vs 8 layers, cpu" in rows[DECOMPOSE]["benchmark"]
    assert rows[MERGE]["ratio"] is None and "killed" in rows[MERGE]["value"]
    assert same_peak_rows({8: by_layers[8]}, "cpu") == []


def test_peak_row_bound_is_the_shard_plus_three_matrices() -> None:
    row = peak_row("decompose", _m(5.0, 440.0), 400.0, 40.0, "8 layers")
    assert row["ratio"] == pytest.approx(440.0 / 520.0) and row["goal"] == 1.0
    assert "= 520 MB" in row["baseline"]
    copy = peak_row(COPY, _m(1.0, 400.0), 400.0, None, "8 layers")
    assert copy["ratio"] == pytest.approx(1.0) and copy["goal"] is None
    killed = peak_row("truncate", _m(9.0, 5000.0, capped=True), 400.0, 40.0, "x", cap_mb=4096)
    assert killed["ratio"] is None and killed["value"].startswith("killed past 4096 MB")
    gpu = peak_row("merge", _m(1.0) | {"cuda_peak_mb": 123.4}, 400.0, 40.0, "x")
    assert gpu["value"].endswith("GPU 123 MB")


def test_steps_pass_the_device_to_decompose_truncate_and_merge_only() -> None:
    defaults = steps(None)
    assert defaults[0].name == DECOMPOSE  # the others read its output
    assert all("device" not in step.kwargs for step in defaults)
    assert {step.stage for step in defaults} == {
        "decompose",
        "copy",
        "contract",
        "merge",
        "truncate",
        "select",
        "inspect",
    }
    names = [step.name for step in defaults]  # the truncation is read after truncate made it
    assert names.index(TRUNCATE) < names.index(MERGE_TRUNCATED)
    assert names.index(TRUNCATE) < names.index(COPY_TRUNCATED)
    cuda = {step.name: step for step in steps("cuda")}
    assert set(cuda) == {DECOMPOSE, COPY, MERGE, TRUNCATE, COPY_TRUNCATED, MERGE_TRUNCATED}
    assert cuda[TRUNCATE].kwargs == {"param_ratio": 0.5, "device": "cuda"}
    assert "device" not in cuda[COPY].kwargs and not cuda[COPY].matrices
    cpu = {step.name: step.kwargs.get("device") for step in steps("cpu")}
    assert cpu[DECOMPOSE] == cpu[MERGE] == cpu[TRUNCATE] == "cpu"
    assert cpu["select --method entropy"] is None


def test_rows_render_in_the_results_table() -> None:
    found = {DECOMPOSE: _m(10.0), TRUNCATE: _m(5.0), MERGE: _m(3.0), COPY: _m(2.0)}
    table = markdown(time_rows(found, "8 layers"), {})
    assert "| 0.50x | <= 1.0x |" in table and "| 1.50x | <= 1.5x |" in table
