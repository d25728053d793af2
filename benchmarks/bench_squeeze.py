"""Dimension squeezing on a hard real-text task: squeeze while training vs cut then train vs
cut alone, at MPO parameter ratios 0.5 and 0.3, over 3 seeds; factorized inference vs dense.

MiniLM with FFN_1, FFN_2 and attention decomposed losslessly (5 cores), fine-tuned with
`overparam` (every weight and core) on `man-sections` for 3 epochs, batch 16, its default rate:

- `squeeze-R`: `train --squeeze-to R --squeeze-steps 3` from the lossless MPO, every ratio and
  seed at the default `--squeeze-until`. Rows logged before the final bonds were planned at the
  first cut (`"allocation": "per-cut"`: each cut allocated anew to R ** (i / 3)) are kept and
  reported apart, with the `--squeeze-until` sweep (0.75, 0.5, 0.25 at R 0.5, seed 0) made then;
- `truncate-train-R`: `truncate --param-ratio R`, then the same training without squeezing;
- `truncate-R`: `truncate --param-ratio R` of the model after dense-equivalent training
  (`overparam` on the lossless MPO, no squeeze), scored without training after the cut.

The dense baseline (`full`, same data, epochs and seeds) is read from
`benchmarks/pruning-runs.jsonl`. Then, in this process: the factorized model's inference time
(`load_model`, forward `auto`) and multiply-adds per token against the dense MiniLM, at each
ratio (batch 16 x 128, median of 10).

Opt-in (about 2 hours on 2 quiet cores): `python -m benchmarks squeeze`. Each finished run is
appended to `benchmarks/squeeze-runs.jsonl` (kept in the repository) and not repeated. Set
MPOSURGEON_SWEEP_DATA to the folder of man-sections-{train,eval}.jsonl (default `data/`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import man_sections_dir, minilm_dir, read_log, spread

HERE = Path(__file__).resolve().parent
LOG = HERE / "squeeze-runs.jsonl"
DENSE_LOG = HERE / "pruning-runs.jsonl"
RATIOS = (0.5, 0.3)
SEEDS = (0, 1, 2)
ARMS = ("squeeze", "truncate-train", "truncate")
ARM_NAMES = {
    "squeeze": "squeeze during training",
    "truncate-train": "truncate, then the same training,",
    "truncate": "truncate of the lossless MPO fine-tuned alone (nothing trained after)",
}
#: Runs logged before `--squeeze-until` existed cut by 0.75 of the run.
OLD_UNTIL = 0.75
#: How the squeeze chose its bonds: "planned" (once, at the first cut: the code now) or
#: "per-cut" (anew at each cut: rows logged before the plan, without this field).
ALLOCATION = "planned"
EPOCHS, BATCH, METHOD = 3, 16, "overparam"


class _Runs:
    """The models of one seed under `root`, each built when first needed."""

    def __init__(self, root: Path, seed: int) -> None:
        import mposurgeon

        self.api, self.root, self.seed = mposurgeon, root, seed
        data = man_sections_dir()
        self.eval_data = data / "man-sections-eval.jsonl"
        self.train_args = {
            "data": data / "man-sections-train.jsonl",
            "eval_data": self.eval_data,
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "seed": seed,
            "method": METHOD,
        }

    def lossless(self) -> Path:
        out = self.root / "lossless"
        if not out.exists():
            self.api.decompose(minilm_dir(), output=out, layers=["FFN_1", "FFN_2", "attention"])
        return out

    def tuned(self) -> Path:
        """The lossless MPO fine-tuned without squeezing (what `truncate-R` cuts)."""
        out = self.root / f"tuned-{self.seed}"
        if not out.exists():
            self.api.train(self.lossless(), output=out, **self.train_args)
        return out

    def arm(self, arm: str, ratio: float, until: float | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        if arm == "squeeze":
            out = self.root / f"squeeze-{ratio}-{until}-{ALLOCATION}-{self.seed}"
            result = self.api.train(
                self.lossless(), output=out,
                squeeze_to=ratio, squeeze_steps=3, squeeze_until=until, **self.train_args,
            )  # fmt: skip
            metrics = result.metrics
            accuracy, params = metrics["eval_accuracy"], metrics["squeeze"]["final_params"]
        elif arm == "truncate-train":
            cut = self.root / f"cut-{ratio}"
            if not cut.exists():
                self.api.truncate(self.lossless(), output=cut, param_ratio=ratio)
            result = self.api.train(
                cut, output=self.root / f"cut-train-{ratio}-{self.seed}", **self.train_args
            )
            accuracy = result.metrics["eval_accuracy"]
            params = self.api.inspect(cut)["params"]["mpo"]
        else:
            cut = self.root / f"tuned-cut-{ratio}-{self.seed}"
            if not cut.exists():
                self.api.truncate(self.tuned(), output=cut, param_ratio=ratio)
            accuracy = self.api.evaluate(cut, data=self.eval_data).metrics["accuracy"]
            params = self.api.inspect(cut)["params"]["mpo"]
        return {
            "arm": arm,
            "ratio": ratio,
            "seed": self.seed,
            "until": until,
            **({"allocation": ALLOCATION} if arm == "squeeze" else {}),
            "eval_accuracy": accuracy,
            "mpo_params": params,
            "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
        }


Key = tuple[str, float, int, float | None, str | None]


def _key(row: dict[str, Any]) -> Key:
    """(arm, ratio, seed, until, allocation); the last two None but for `squeeze`."""
    if row["arm"] != "squeeze":
        return row["arm"], row["ratio"], row["seed"], None, None
    until = row.get("until", OLD_UNTIL)
    return row["arm"], row["ratio"], row["seed"], until, row.get("allocation", "per-cut")


def _plan() -> list[Key]:
    """Every run of the current code: each arm, ratio and seed."""
    from mposurgeon.training.squeeze import SQUEEZE_UNTIL

    return [
        (arm, ratio, seed, *((SQUEEZE_UNTIL, ALLOCATION) if arm == "squeeze" else (None, None)))
        for seed in SEEDS
        for ratio in RATIOS
        for arm in ARMS
    ]


def sweep(root: Path) -> list[dict[str, Any]]:
    """Every planned run not in the log yet; all logged runs."""
    done = {_key(r): r for r in read_log(LOG)}
    seeds: dict[int, _Runs] = {}
    for arm, ratio, seed, until, allocation in _plan():
        if (arm, ratio, seed, until, allocation) in done:
            continue
        runs = seeds.setdefault(seed, _Runs(root, seed))
        row = runs.arm(arm, ratio, until)
        done[_key(row)] = row
        with LOG.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return list(done.values())


def _median_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.inference_mode():
        model(**batch)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference(root: Path) -> list[dict[str, Any]]:
    """Factorized inference time and multiply-adds per token at each ratio, vs dense."""
    from transformers import AutoModel

    import mposurgeon
    from mposurgeon.methods.mpo.state import mpo_cores
    from mposurgeon.mpo.contract import contract_flops, reconstruct_flops

    runs = _Runs(root, 0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 128)),
        "attention_mask": torch.ones(16, 128, dtype=torch.long),
    }
    dense = _median_seconds(AutoModel.from_pretrained(minilm_dir()).eval(), batch)
    rows = []
    for ratio in RATIOS:
        cut = root / f"cut-{ratio}"
        if not cut.exists():
            mposurgeon.truncate(runs.lossless(), output=cut, param_ratio=ratio)
        model = mposurgeon.load_model(cut)
        tokens = batch["input_ids"].numel()
        macs = dense_macs = 0
        for c in mpo_cores(model).values():  # what forward `auto` picks: the cheaper
            dense_product = tokens * c.shape.out_dim * c.shape.in_dim
            cores = list(c.core)
            macs += min(contract_flops(cores, tokens), reconstruct_flops(cores) + dense_product)
            dense_macs += dense_product
        seconds = _median_seconds(model, batch)
        rows.append(
            {
                "benchmark": f"inference, MiniLM MPO at {ratio} of the MPO parameters "
                f"(load_model, forward auto, batch 16x128, CPU; its MPO layers' multiply-adds "
                f"{macs / dense_macs:.2f}x the dense ones')",
                "threads": torch.get_num_threads(),
                "value": f"{seconds:.3f} s",
                "baseline": f"dense MiniLM {dense:.3f} s",
                "ratio": seconds / dense,
                "goal": None,
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    """Benchmark rows: each (arm, ratio) over the seeds against dense `full`."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = sweep(Path(tmp))
        timed = inference(Path(tmp))
    dense = [r["eval_accuracy"] for r in read_log(DENSE_LOG) if r["arm"] == "dense"]
    baseline = f"dense full {spread(dense)}" if dense else "dense full: not run"
    from mposurgeon.training.squeeze import SQUEEZE_UNTIL

    rows = []
    groups: dict[tuple[str, float, float | None, str | None], list[dict[str, Any]]] = {}
    for r in runs:
        arm, ratio, _, until, allocation = _key(r)
        groups.setdefault((arm, ratio, until, allocation), []).append(r)

    def place(group: tuple[str, float, float | None, str | None]) -> tuple[bool, float, int, str]:
        """Current runs first, by ratio and arm; the squeezes of the per-cut allocation last."""
        arm, ratio, _, allocation = group
        return arm == "squeeze" and allocation != ALLOCATION, -ratio, ARMS.index(arm), str(group)

    order = sorted(groups.items(), key=lambda g: place(g[0]))
    for (arm, ratio, until, allocation), items in order:
        accuracy = [r["eval_accuracy"] for r in items]
        schedule = ""
        if until is not None:
            mark = ", its default" if until == SQUEEZE_UNTIL else ""
            schedule = f", cuts by {until:g} of the run{mark}"
            if allocation != ALLOCATION:
                schedule += ", bonds allocated anew at each cut (before the plan)"
        rows.append(
            {
                "benchmark": f"man-sections eval accuracy, {ARM_NAMES[arm]} to {ratio} of the MPO "
                f"parameters{schedule} ({items[0]['mpo_params']:,}; MiniLM, {METHOD}, {EPOCHS} "
                f"epochs, seeds {','.join(str(r['seed']) for r in items)})",
                "threads": items[0]["threads"],
                "value": spread(accuracy),
                "baseline": baseline,
                "ratio": statistics.mean(accuracy) / statistics.mean(dense) if dense else None,
                "goal": None,
            }
        )
    return rows + timed


if __name__ == "__main__":
    for row in run():
        print(row)
