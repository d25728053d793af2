"""MPO mixtures of experts on a hard real-text task: accuracy, size and step time vs dense.

MiniLM's 6 FFN blocks upcycled (`moe`, lossless MPO, 5 cores, top-1, seed = the run's seed)
to 4 and 8 experts, fine-tuned whole (`train --method mpoe`) on `man-sections` for 3 epochs,
batch 16; first a learning-rate sweep at 4 experts, seed 0 (`SWEEP`), then each expert count at
the default rate for seeds 0, 1, 2. The dense baseline (`full` at its default, the same data,
epochs and seeds) is read from `benchmarks/pruning-runs.jsonl` (`python -m benchmarks pruning`),
run under the same protocol. Then, in this process: the parameters of the MPOE layers against
Switch-style upcycling (E dense experts), and the time of one training step (batch 16 x 128,
median of 5) against a dense `full` step.

Opt-in (about 90 minutes on 2 quiet cores): `python -m benchmarks mpoe`. Each finished run is
appended to `benchmarks/mpoe-runs.jsonl` (kept in the repository) and not repeated. Set
MPOSURGEON_SWEEP_DATA to the folder of man-sections-{train,eval}.jsonl (default `data/`), and
MPOSURGEON_MPOE_SWEEP_ONLY=1 to run the learning-rate sweep alone.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import man_sections_dir, minilm_dir, read_log, spread

HERE = Path(__file__).resolve().parent
LOG = HERE / "mpoe-runs.jsonl"
DENSE_LOG = HERE / "pruning-runs.jsonl"
SWEEP = (5e-5, 1e-4, 2e-4)
EXPERTS = (4, 8)
SEEDS = (0, 1, 2)
EPOCHS, BATCH = 3, 16


def _plan() -> list[tuple[int, float, int]]:
    """(experts, lr, seed) of every run: the sweep, then the default rate per seed."""
    from mposurgeon.methods.registry import method_config

    runs = [(EXPERTS[0], lr, 0) for lr in SWEEP]
    if os.environ.get("MPOSURGEON_MPOE_SWEEP_ONLY") == "1":
        return runs
    default = method_config("mpoe").default("lr")
    runs += [(e, default, s) for e in EXPERTS for s in SEEDS if (e, default, s) not in runs]
    return runs


def sweep(root: Path) -> list[dict[str, Any]]:
    """Every planned run not in the log yet (models under `root`); all logged runs."""
    import mposurgeon

    data = man_sections_dir()
    done = {(r["experts"], r["lr"], r["seed"]): r for r in read_log(LOG)}
    for experts, lr, seed in _plan():
        if (experts, lr, seed) in done:
            continue
        upcycled = root / f"moe-{experts}-{seed}"
        if not upcycled.exists():
            mposurgeon.moe(minilm_dir(), output=upcycled, experts=experts, seed=seed)
        start = time.perf_counter()
        result = mposurgeon.train(
            upcycled,
            output=root / f"mpoe-{experts}-{lr:g}-{seed}",
            method="mpoe",
            lr=lr,
            data=data / "man-sections-train.jsonl",
            eval_data=data / "man-sections-eval.jsonl",
            epochs=EPOCHS,
            batch_size=BATCH,
            seed=seed,
        )
        m = result.metrics
        row = {
            "experts": experts,
            "lr": lr,
            "seed": seed,
            "eval_accuracy": m["eval_accuracy"],
            "eval_macro_f1": m["eval_macro_f1"],
            "trainable_params": m["trainable_params"],
            "expert_load": m.get("expert_load"),
            "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
        }
        done[(experts, lr, seed)] = row
        with LOG.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return list(done.values())


def _step_seconds(source: Path, method: str, root: Path) -> float:
    """Median seconds of a training step (batch 16 x 128) of `method` on `source`: 6 steps
    timed by the run's own clock, the first left out."""
    import mposurgeon

    data = man_sections_dir() / "man-sections-train.jsonl"
    times = []
    for steps in (1, 6):
        start = time.perf_counter()
        mposurgeon.train(
            source, output=root / f"step-{method}-{steps}", method=method, data=data,
            max_steps=steps, batch_size=BATCH, max_length=128, overwrite=True,
        )  # fmt: skip
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / 5


def deployment(root: Path) -> list[dict[str, Any]]:
    """Parameters vs dense experts, and training step time vs dense, per expert count."""
    import mposurgeon

    rows = []
    dense_step = _step_seconds(minilm_dir(), "full", root)
    for experts in EXPERTS:
        upcycled = root / f"moe-{experts}-0"
        if not upcycled.exists():
            mposurgeon.moe(minilm_dir(), output=upcycled, experts=experts, seed=0)
        counts = mposurgeon.moe(minilm_dir(), experts=experts, dry_run=True)
        rows.append(
            {
                "benchmark": f"MPOE FFN parameters, MiniLM, {experts} experts (6 blocks; "
                f"shared central cores {counts.shared:,}, {counts.per_expert:,} per expert)",
                "threads": "-",
                "value": f"{counts.mpoe:,}",
                "baseline": f"{experts} dense experts (Switch-style) {counts.dense_experts:,}",
                "ratio": counts.mpoe / counts.dense_experts,
                "goal": None,
            }
        )
        step = _step_seconds(upcycled, "mpoe", root)
        rows.append(
            {
                "benchmark": f"train step, mpoe {experts} experts (MiniLM, batch 16x128, CPU)",
                "threads": torch.get_num_threads(),
                "value": f"{step:.3f} s",
                "baseline": f"full (dense) step {dense_step:.3f} s",
                "ratio": step / dense_step,
                "goal": None,
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    """Benchmark rows: the sweep, each expert count over the seeds against dense `full`."""
    from mposurgeon.methods.registry import method_config

    with tempfile.TemporaryDirectory() as tmp:
        runs = sweep(Path(tmp))
        deployed = deployment(Path(tmp))
    dense = [r["eval_accuracy"] for r in read_log(DENSE_LOG) if r["arm"] == "dense"]
    baseline = f"dense full {spread(dense)}" if dense else "dense full: not run"
    default = method_config("mpoe").default("lr")
    rows = []
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["experts"], r["lr"]), []).append(r)
    for (experts, lr), items in sorted(groups.items()):
        accuracy = [r["eval_accuracy"] for r in items]
        mark = " (its default)" if lr == default else ""
        rows.append(
            {
                "benchmark": f"man-sections eval accuracy, mpoe {experts} experts, lr {lr:g}"
                f"{mark} (MiniLM, {EPOCHS} epochs, seeds "
                f"{','.join(str(r['seed']) for r in items)}; {items[0]['trainable_params']:,} "
                "trained)",
                "threads": items[0]["threads"],
                "value": spread(accuracy),
                "baseline": baseline,
                "ratio": statistics.mean(accuracy) / statistics.mean(dense) if dense else None,
                "goal": None,
            }
        )
    return rows + deployed


if __name__ == "__main__":
    for row in run():
        print(row)
