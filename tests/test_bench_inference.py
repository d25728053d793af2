"""The factorized-inference benchmark's own logic (no timings): what "auto" picked, counted
and put in words, multiply-add totals, early stopping, inputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks.bench_inference import (
    LayerCheck,
    describe_checks,
    describe_modes,
    interleaved_best,
    layer_macs,
    macs,
    mode_counts,
    mpo_linears,
    token_batch,
)
from mposurgeon.mpo.contract import contract_flops, reconstruct_flops


def _check(chosen: str, contract: float | None, reconstruct: float | None) -> LayerCheck:
    return LayerCheck(
        name="encoder.layer.0.intermediate.dense",
        group="FFN_1",
        shape=(1536, 384),
        rows=128,
        chosen=chosen,  # type: ignore[arg-type]
        macs={"contract": 10, "reconstruct": 20},
        seconds={"contract": contract, "reconstruct": reconstruct},
    )


def test_describe_modes_counts_per_group_in_order() -> None:
    counts = {
        "attention": Counter(contract=24),
        "FFN_1": Counter(contract=3, reconstruct=3),
        "FFN_2": Counter(),
    }
    assert describe_modes(counts) == "attention 24 contract, FFN_1 3 contract + 3 reconstruct"
    assert describe_modes({}) == "none"


def test_layer_check_faster_and_slowdown() -> None:
    check = _check("contract", 0.030, 0.010)
    assert check.faster == "reconstruct"
    assert check.slowdown == pytest.approx(3.0)
    untimed = _check("reconstruct", None, 0.010)
    assert untimed.faster == "reconstruct"
    assert untimed.slowdown == 1.0
    assert untimed.as_dict()["ms"] == {"contract": None, "reconstruct": 10.0}


def test_describe_checks_reports_slower_picks_with_both_times() -> None:
    text = describe_checks([_check("contract", 0.030, 0.010), _check("reconstruct", 0.5, 0.011)])
    assert text == (
        "auto picked the slower path: FFN_1 1536x384 contract 30.0 ms vs reconstruct 10.0 ms"
    )


def test_describe_checks_within_tolerance_counts_untimed() -> None:
    text = describe_checks([_check("contract", 0.011, 0.010), _check("reconstruct", None, 0.01)])
    assert text.startswith("auto's pick within 1.2x of the faster mode for all 2 layer shapes")
    assert text.endswith("the other mode untimed for 1 (> 8x the multiply-adds)")
    assert describe_checks([_check("contract", 0.011, 0.010)], slower=1.05).startswith(
        "auto picked the slower path"
    )


def test_interleaved_best_runs_each_in_turn_and_stops_past_the_ratio() -> None:
    calls: list[str] = []
    best = interleaved_best([lambda: calls.append("a"), lambda: calls.append("b")], rounds=3)
    assert calls == ["a", "b"] * 4  # a warm-up each, then 3 rounds in turn
    assert len(best) == 2 and all(t >= 0 for t in best)
    calls.clear()
    interleaved_best([lambda: calls.append("a"), lambda: calls.append("b")], 3, stop_ratio=-1.0)
    assert calls == ["a", "b"] * 2  # the warm-ups and one round
    calls.clear()
    interleaved_best([lambda: calls.append("a"), lambda: calls.append("b")], 3, stop_ratio=1e12)
    assert len(calls) == 8
    calls.clear()
    assert len(interleaved_best([lambda: calls.append("a")], 3, stop_ratio=-1.0)) == 1
    assert calls == ["a"] * 4  # one mode timed alone: nothing to stop on


def test_token_batch_is_seeded_and_in_range() -> None:
    batch = token_batch(3, 7, vocab=50)
    assert batch["input_ids"].shape == (3, 7)
    assert int(batch["input_ids"].min()) >= 0 and int(batch["input_ids"].max()) < 50
    assert torch.equal(batch["attention_mask"], torch.ones(3, 7, dtype=torch.long))
    assert torch.equal(batch["input_ids"], token_batch(3, 7, vocab=50)["input_ids"])
    assert not torch.equal(batch["input_ids"], token_batch(3, 7, 50, seed=1)["input_ids"])


@pytest.mark.parametrize("mode", ["contract", "reconstruct"])
def test_mode_counts_and_macs_follow_the_layers(tiny_mpo: Path, mode: str) -> None:
    import mposurgeon

    model = mposurgeon.load_model(tiny_mpo, task="base", forward_mode=mode)  # type: ignore[arg-type]
    layers = mpo_linears(model)
    assert layers
    counts = mode_counts(model, rows=16)
    assert set(counts) == {"FFN_1", "attention"}  # the groups tiny_mpo decomposed
    assert sum(c[mode] for c in counts.values()) == len(layers)
    picked, dense = macs(model, rows=16)
    assert dense == sum(16 * m.out_features * m.in_features for m in layers.values())
    expected = 0
    for layer in layers.values():
        cores, product = layer.mpo.cores, 16 * layer.out_features * layer.in_features
        each = {"contract": contract_flops(cores, 16), "reconstruct": reconstruct_flops(cores)}
        each["reconstruct"] += product
        assert layer_macs(layer, 16) == each
        expected += each[mode]
    assert picked == expected


def test_mode_counts_in_auto_match_each_layers_choice(tiny_mpo: Path) -> None:
    import mposurgeon

    model = mposurgeon.load_model(tiny_mpo, task="base")
    for rows in (1, 4096):
        counts = mode_counts(model, rows)
        chosen = Counter(m.chosen_mode(rows) for m in mpo_linears(model).values())
        assert sum(counts.values(), Counter()) == chosen
