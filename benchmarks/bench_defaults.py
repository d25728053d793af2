"""Learning-rate sweep per training method on a hard real-text task: what the defaults should be.

MiniLM (FFN_1, FFN_2 and attention as lossless MPO for `lightweight` and `overparam`; dense for
`full` and the parameter-efficient methods, at their default options) fine-tuned
on `man-sections` (5 classes of Debian manual pages, 1,024 training and 341 evaluation rows,
shipped in the shared data folder; see its README) for 3 epochs, seed 0, batch 16, and each mode
at several learning rates. The figure is eval accuracy after the last epoch; the baseline is
dense `full` fine-tuning at its own default learning rate, measured in the same run.

Opt-in (hours on 2 quiet CPU cores): `python -m benchmarks defaults`; set
MPOSURGEON_SWEEP_METHODS=lora,ia3 to sweep only those methods, and
MPOSURGEON_SWEEP_DEFAULTS_ONLY=1 to run each at its default rate only. Set
MPOSURGEON_SWEEP_DATA to the folder holding man-sections-{train,eval}.jsonl when it is not
`../shared/data` beside the repository. Each finished run is appended to
`benchmarks/defaults-sweep.jsonl` (kept in the repository), and runs found there are not
repeated, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import minilm_dir

HERE = Path(__file__).resolve().parent
#: mode -> learning rates tried; the baseline is `full` at its default (training/defaults.py).
GRID: dict[str, tuple[float, ...]] = {
    "full": (2e-5, 5e-5, 1e-4, 2e-4),
    "lightweight": (2e-5, 3e-4, 5e-4, 1e-3, 3e-3),
    "overparam": (2e-5, 1e-4, 2e-4, 5e-4),
    "lora": (5e-4, 2e-3),
    "dsee": (2e-3, 1e-2),
    "ia3": (3e-3, 1e-2),
    "prompt-tuning": (3e-2, 3e-1),
    "prefix-tuning": (1e-2, 1e-1),
    "bitfit": (1e-3, 1e-2),
    "apet": (1e-3, 1e-2),
    "adapter": (1e-3, 3e-3),
}
#: The methods that train MPO cores: they start from MiniLM decomposed losslessly.
MPO_METHODS = ("lightweight", "overparam")
EPOCHS, SEED, BATCH = 3, 0, 16
#: Every finished run, kept in the repository: the figures behind each default, and a sweep
#: resumes across machines (rows from before the log was kept came from RESULTS.md).
LOG = HERE / "defaults-sweep.jsonl"


def data_dir() -> Path:
    """Where man-sections-{train,eval}.jsonl are (MPOSURGEON_SWEEP_DATA, else ../shared/data)."""
    default = HERE.parent.parent / "shared" / "data"
    path = Path(os.environ.get("MPOSURGEON_SWEEP_DATA", default))
    if not (path / "man-sections-train.jsonl").is_file():
        raise SystemExit(f"man-sections data not found in {path}: set MPOSURGEON_SWEEP_DATA")
    return path


def _methods() -> list[str]:
    """The methods to sweep: MPOSURGEON_SWEEP_METHODS (comma-separated), else all of GRID."""
    chosen = os.environ.get("MPOSURGEON_SWEEP_METHODS")
    if not chosen:
        return list(GRID)
    names = [m.strip() for m in chosen.split(",") if m.strip()]
    unknown = sorted(set(names) - set(GRID))
    if unknown:
        raise SystemExit(f"MPOSURGEON_SWEEP_METHODS: not in GRID: {', '.join(unknown)}")
    return names


def _rates(method: str) -> tuple[float, ...]:
    """The rates to try for `method`: GRID's, or with MPOSURGEON_SWEEP_DEFAULTS_ONLY=1 only
    its default (to fill in the table of every method at its default)."""
    if os.environ.get("MPOSURGEON_SWEEP_DEFAULTS_ONLY") == "1":
        from mposurgeon.methods.registry import method_config

        return (method_config(method).default("lr"),)
    return GRID[method]


def _done() -> dict[tuple[str, float], dict[str, Any]]:
    if not LOG.is_file():
        return {}
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    return {(r["mode"], r["lr"]): r for r in rows}


def sweep() -> list[dict[str, Any]]:
    """Train every (mode, lr) of GRID not in the log yet; return all logged runs."""
    import mposurgeon

    data = data_dir()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    done = _done()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mpo = root / "mpo"
        for mode in _methods():
            for lr in _rates(mode):
                if (mode, lr) in done:
                    continue
                source = minilm_dir()
                if mode in MPO_METHODS:
                    if not mpo.exists():
                        mposurgeon.decompose(
                            source, output=mpo, layers=["FFN_1", "FFN_2", "attention"]
                        )
                    source = mpo
                start = time.perf_counter()
                result = mposurgeon.train(
                    source,
                    output=root / f"{mode}-{lr:g}",
                    data=data / "man-sections-train.jsonl",
                    eval_data=data / "man-sections-eval.jsonl",
                    method=mode,
                    lr=lr,
                    epochs=EPOCHS,
                    batch_size=BATCH,
                    seed=SEED,
                )
                row = {
                    "mode": mode,
                    "lr": lr,
                    "eval_accuracy": result.metrics["eval_accuracy"],
                    "eval_macro_f1": result.metrics["eval_macro_f1"],
                    "final_loss": result.metrics["final_loss"],
                    "trainable_params": result.metrics["trainable_params"],
                    "seconds": round(time.perf_counter() - start, 1),
                    "threads": torch.get_num_threads(),
                }
                done[(mode, lr)] = row
                with LOG.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    return list(done.values())


def run() -> list[dict[str, Any]]:
    """Benchmark rows: each (mode, lr) accuracy against dense `full` at its default rate."""
    from mposurgeon.methods.registry import method_config

    runs = sweep()
    baseline_lr = method_config("full").default("lr")
    base = next(r for r in runs if r["mode"] == "full" and r["lr"] == baseline_lr)
    rows = []
    for r in sorted(runs, key=lambda r: (list(GRID).index(r["mode"]), r["lr"])):
        default = " (its default)" if r["lr"] == method_config(r["mode"]).default("lr") else ""
        rows.append(
            {
                "benchmark": f"man-sections eval accuracy, {r['mode']} lr {r['lr']:g}{default} "
                f"(MiniLM, {EPOCHS} epochs, seed {SEED}; {r['trainable_params']:,} trained)",
                "threads": r["threads"],
                "value": f"{r['eval_accuracy']:.3f} (macro-F1 {r['eval_macro_f1']:.3f}, "
                f"{r['seconds']:.0f} s)",
                "baseline": f"full lr {baseline_lr:g}: {base['eval_accuracy']:.3f}",
                "ratio": r["eval_accuracy"] / base["eval_accuracy"],
                "goal": None,
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
