"""How decompose time grows with matrix size (n x n, 256 to 4096), next to the SVD's growth."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import best_time
from mposurgeon.mpo.decomposition import decompose
from mposurgeon.mpo.shapes import plan_shape

SIZES = (256, 512, 1024, 2048, 4096)


def run() -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    first: tuple[float, float] | None = None
    for n in SIZES:
        w = torch.randn(n, n, generator=generator)
        shape = plan_shape(n, n, 5)
        repeats = 3 if n <= 1024 else 1
        svd = best_time(lambda w=w: torch.linalg.svd(w, full_matrices=False), repeats)
        mpo = best_time(lambda w=w, shape=shape: decompose(w, shape), repeats)
        first = first or (svd, mpo)
        rows.append(
            {
                "benchmark": f"decompose {n}x{n} (growth vs 256: MPO {mpo / first[1]:.0f}x, "
                f"SVD {svd / first[0]:.0f}x)",
                "threads": torch.get_num_threads(),
                "value": f"{mpo:.4f} s",
                "baseline": f"torch.linalg.svd {svd:.4f} s",
                "ratio": mpo / svd,
                "goal": None,
            }
        )
    return rows
