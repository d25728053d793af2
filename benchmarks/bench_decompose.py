"""decompose of MiniLM's 36 encoder matrices vs plain torch.linalg.svd of the same matrices."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import best_time, minilm_dir, minilm_encoder_matrices
from mposurgeon.mpo.decomposition import decompose
from mposurgeon.mpo.shapes import plan_shape


def run() -> list[dict[str, Any]]:
    matrices = minilm_encoder_matrices()
    shapes = {name: plan_shape(w.shape[0], w.shape[1], 5) for name, w in matrices.items()}

    def svd_all() -> None:
        for w in matrices.values():
            torch.linalg.svd(w, full_matrices=False)

    def mpo_all() -> None:
        for name, w in matrices.items():
            decompose(w, shapes[name])

    def stage() -> None:
        import mposurgeon

        with tempfile.TemporaryDirectory() as tmp:
            mposurgeon.decompose(
                minilm_dir(), output=Path(tmp) / "o", layers=["FFN_1", "FFN_2", "attention"]
            )

    rows = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            svd = best_time(svd_all)
            rows.append(
                _row("decompose math, 36 MiniLM matrices", threads, best_time(mpo_all), svd)
            )
            rows.append(
                _row("decompose stage (I/O, error check)", threads, best_time(stage, 2), svd)
            )
    finally:
        torch.set_num_threads(previous)
    return rows


def _row(what: str, threads: int, seconds: float, baseline: float) -> dict[str, Any]:
    return {
        "benchmark": what,
        "threads": threads,
        "value": f"{seconds:.3f} s",
        "baseline": f"torch.linalg.svd of the same matrices {baseline:.3f} s",
        "ratio": seconds / baseline,
        "goal": 1.1,
    }
