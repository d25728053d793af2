"""DSEE and pruning on a hard real-text task: what each cut costs, over 3 seeds.

MiniLM fine-tuned on `man-sections` (5 classes of Debian manual pages; see data/README.md) for
3 epochs, batch 16, each method at its default learning rate, seeds 0, 1, 2:

- `dense`: `full` fine-tuning (every weight), the baseline;
- `dsee`: LoRA r 16 + 64 sparse entries (GoDec) on query and value (148,224 trained + head);
- `lora-r16`: LoRA r 16 on the same matrices (147,456 + head: DSEE's count less its 768 sparse
  entries, equal within 0.5%);
- `unstructured-50`: the dense fine-tuned model with the smallest half of every block matrix
  pruned (`prune --sparsity 0.5`), scored as cut, then re-tuned with `dsee` (mask kept);
- `ffn-50`: the dense fine-tuned model with half of every FFN's intermediate neurons removed
  (`prune --ffn-neurons 768 --score magnitude`), scored as cut, then re-tuned with `dsee`.

Then, on seed 0's models: the size of each merged checkpoint, and the inference time of the
FFN-pruned model against the dense one (`transformers` forward, batch 16 x 128, median of 20).

Opt-in (about 70 minutes on 2 quiet cores): `python -m benchmarks pruning`. Each finished run is
appended to `benchmarks/pruning-runs.jsonl` (kept in the repository) and not repeated, so an
interrupted run resumes; the models are rebuilt where a later run needs them. Set
MPOSURGEON_SWEEP_DATA to the folder of man-sections-{train,eval}.jsonl (default `data/`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import man_sections_dir, minilm_dir, spread

HERE = Path(__file__).resolve().parent
LOG = HERE / "pruning-runs.jsonl"
SEEDS = (0, 1, 2)
EPOCHS, BATCH = 3, 16
FFN_NEURONS = 768  # half of MiniLM's 1,536
ARMS = ("dense", "dsee", "lora-r16", "unstructured-50", "ffn-50")


def _done() -> dict[tuple[str, int], dict[str, Any]]:
    if not LOG.is_file():
        return {}
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    return {(r["arm"], r["seed"]): r for r in rows}


class _Runs:
    """The runs of one seed in one scratch folder, each built once when first needed."""

    def __init__(self, root: Path, seed: int) -> None:
        import mposurgeon

        self.api = mposurgeon
        self.root = root
        self.seed = seed
        data = man_sections_dir()
        self.train_args = {
            "data": data / "man-sections-train.jsonl",
            "eval_data": data / "man-sections-eval.jsonl",
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "seed": seed,
        }
        self.eval_data = data / "man-sections-eval.jsonl"
        self.dense_metrics: dict[str, Any] = {}

    def _path(self, name: str) -> Path:
        return self.root / f"{name}-{self.seed}"

    def train(self, name: str, source: Path, **options: Any) -> tuple[Path, dict[str, Any]]:
        out = self._path(name)
        start = time.perf_counter()
        result = self.api.train(source, output=out, **self.train_args, **options)
        metrics = dict(result.metrics) | {"seconds": round(time.perf_counter() - start, 1)}
        return out, metrics

    def dense(self) -> Path:
        """The dense fine-tuned model (the `dense` arm's, trained when first needed)."""
        out = self._path("dense")
        if not out.exists():
            self.dense_metrics = self.train("dense", minilm_dir(), method="full")[1]
        return out

    def pruned(self, arm: str) -> Path:
        out = self._path(f"{arm}-cut")
        if not out.exists():
            if arm == "unstructured-50":
                self.api.prune(self.dense(), output=out, sparsity=0.5)
            else:
                self.api.prune(self.dense(), output=out, ffn_neurons=FFN_NEURONS)
        return out

    def merged(self, name: str, source: Path) -> Path:
        out = self._path(f"{name}-merged")
        if not out.exists():
            self.api.merge(source, output=out)
        return out

    def arm(self, arm: str) -> dict[str, Any]:
        """Train `arm`; its row (accuracy, macro-F1, trained parameters, seconds)."""
        extra: dict[str, Any] = {}
        if arm == "dense":
            out = self.dense()
            metrics = self.dense_metrics
        elif arm == "dsee":
            out, metrics = self.train(arm, minilm_dir(), method="dsee")
        elif arm == "lora-r16":
            # PEFT's default targets for BERT: query and value, as DSEE's; scale 2 as DSEE's
            out, metrics = self.train(arm, minilm_dir(), method="lora", lora_r=16, lora_alpha=32)
        else:
            cut = self.pruned(arm)
            extra["accuracy_as_cut"] = self.api.evaluate(cut, data=self.eval_data).metrics[
                "accuracy"
            ]
            out, metrics = self.train(f"{arm}-retuned", cut, method="dsee")
        return {
            "arm": arm,
            "seed": self.seed,
            "eval_accuracy": metrics["eval_accuracy"],
            "eval_macro_f1": metrics["eval_macro_f1"],
            "trainable_params": metrics["trainable_params"],
            "seconds": metrics["seconds"],
            "threads": torch.get_num_threads(),
            "output": out.name,
            **extra,
        }


def sweep(root: Path) -> list[dict[str, Any]]:
    """Every (arm, seed) not in the log yet, models under `root`; all logged runs."""
    done = _done()
    for seed in SEEDS:
        runs = _Runs(root, seed)
        for arm in ARMS:
            if (arm, seed) in done:
                continue
            row = runs.arm(arm)
            done[(arm, seed)] = row
            with LOG.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return list(done.values())


def _median_seconds(fn: Callable[[], Any], repeats: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def deployment(root: Path) -> list[dict[str, Any]]:
    """Merged file sizes and FFN-pruned inference time, on seed 0's dense and pruned models
    (those under `root`, else built: a dense fine-tuning and two cuts)."""
    from transformers import AutoModelForSequenceClassification

    runs = _Runs(root, 0)
    dense = runs.merged("dense", runs.dense())
    sparse = runs.merged("unstructured-50", runs.pruned("unstructured-50"))
    ffn = runs.merged("ffn-50", runs.pruned("ffn-50"))
    rows = []
    for label, path in (("50% unstructured (exact zeros)", sparse), ("50% FFN", ffn)):
        rows.append(
            {
                "benchmark": f"merged checkpoint size, MiniLM {label} pruned",
                "threads": "-",
                "value": f"{_size(path) / 1e6:.1f} MB",
                "baseline": f"dense {_size(dense) / 1e6:.1f} MB",
                "ratio": _size(path) / _size(dense),
                "goal": None,
            }
        )
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 128)),
        "attention_mask": torch.ones(16, 128, dtype=torch.long),
    }
    seconds = {}
    for name, path in (("dense", dense), ("ffn", ffn)):
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.inference_mode():
            seconds[name] = _median_seconds(lambda m=model: m(**batch))
    rows.append(
        {
            "benchmark": "inference, MiniLM with half its FFN neurons removed "
            "(transformers forward, batch 16x128, CPU)",
            "threads": torch.get_num_threads(),
            "value": f"{seconds['ffn']:.3f} s",
            "baseline": f"dense {seconds['dense']:.3f} s",
            "ratio": seconds["ffn"] / seconds["dense"],
            "goal": None,
        }
    )
    return rows


def run() -> list[dict[str, Any]]:
    """Benchmark rows: each arm's mean accuracy over the seeds against dense fine-tuning."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = sweep(Path(tmp))
        deployed = deployment(Path(tmp))
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    dense = [r["eval_accuracy"] for r in by_arm["dense"]]
    rows = []
    for arm, items in by_arm.items():
        accuracy = [r["eval_accuracy"] for r in items]
        note = ""
        if "accuracy_as_cut" in items[0]:
            note = f"; as cut {spread([r['accuracy_as_cut'] for r in items])}"
        rows.append(
            {
                "benchmark": f"man-sections eval accuracy, {arm} (MiniLM, {EPOCHS} epochs, "
                f"seeds {','.join(str(r['seed']) for r in items)}; "
                f"{items[0]['trainable_params']:,} trained{note})",
                "threads": items[0]["threads"],
                "value": spread(accuracy),
                "baseline": f"dense full {spread(dense)}",
                "ratio": statistics.mean(accuracy) / statistics.mean(dense),
                "goal": None,
            }
        )
    return rows + deployed


if __name__ == "__main__":
    for row in run():
        print(row)
