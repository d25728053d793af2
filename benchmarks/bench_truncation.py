"""Truncation on MiniLM's 36 encoder matrices: error versus parameters, and the stage's time.

Error curve: each matrix W (float64) is decomposed losslessly into a 5-core MPO, then cut to
`ratio * out * in` parameters (bonds chosen by `mpo.allocation.allocate`, cut as the stage cuts:
`mpo.decomposition.recompress`) and compared with a truncated SVD of W of the same parameter
count (rank floor(ratio * out * in / (out + in))). Reported: the mean relative Frobenius error
per matrix type. Allocation: the global `--param-ratio` allocation against a uniform per-module
split at the same total. Time: the `truncate --param-ratio 0.5` stage against plain SVDs of the
matrices, and against the `decompose` stage that makes its input (both at default options;
goal <= 1).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import best_time, minilm_dir, minilm_encoder_matrices
from mposurgeon.mpo.allocation import BondProblem, allocate
from mposurgeon.mpo.contract import to_matrix
from mposurgeon.mpo.decomposition import decompose, recompress
from mposurgeon.mpo.metrics import num_params, relative_error
from mposurgeon.mpo.shapes import plan_shape

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def run() -> list[dict[str, Any]]:
    matrices = {name: w.double() for name, w in minilm_encoder_matrices().items()}
    kinds = {name: "FFN" if ".attention." not in name else "attention" for name in matrices}
    prepared = {name: _prepare(w) for name, w in matrices.items()}
    rows = []
    for kind in ("FFN", "attention"):
        names = [n for n in matrices if kinds[n] == kind]
        for ratio in RATIOS:
            mpo = [_mpo_error(matrices[n], *prepared[n][:2], ratio) for n in names]
            svd = [_svd_error(matrices[n], prepared[n][2], ratio) for n in names]
            mean_mpo, mean_svd = statistics.mean(mpo), statistics.mean(svd)
            rows.append(
                {
                    "benchmark": f"truncation error at {ratio:.1f}x dense params, "
                    f"{kind} ({len(names)} matrices, {_shape(matrices[names[0]])})",
                    "threads": None,
                    "value": f"MPO mean rel. error {mean_mpo:.3f}",
                    "baseline": f"truncated SVD, same params {mean_svd:.3f}",
                    "ratio": mean_mpo / mean_svd,
                    "goal": None,
                }
            )
    rows.append(_allocation_row(prepared))
    rows.extend(_stage_rows(matrices))
    return rows


def _prepare(w: torch.Tensor) -> tuple[list[torch.Tensor], BondProblem, torch.Tensor]:
    """Lossless MPO cores, their allocation problem, and W's singular values."""
    shape = plan_shape(w.shape[0], w.shape[1], 5)
    dec = decompose(w, shape)
    return dec.cores, BondProblem.from_cores(dec.cores, dec.spectra), torch.linalg.svdvals(w)


def _mpo_error(
    w: torch.Tensor, cores: list[torch.Tensor], problem: BondProblem, ratio: float
) -> float:
    (plan,) = allocate([problem], target_params=round(ratio * w.numel()))
    shape = plan_shape(w.shape[0], w.shape[1], 5)
    cut, _ = recompress(cores, shape, list(plan[1:-1]))  # as the truncate stage cuts
    assert num_params(cut.cores) <= ratio * w.numel()
    return relative_error(w, to_matrix(cut.cores, shape))


def _svd_error(w: torch.Tensor, singular_values: torch.Tensor, ratio: float) -> float:
    rank = math.floor(ratio * w.numel() / sum(w.shape))
    tail = float(singular_values[rank:].square().sum())
    return math.sqrt(tail / float(singular_values.square().sum()))


def _shape(w: torch.Tensor) -> str:
    return f"{w.shape[0]}x{w.shape[1]}"


def _allocation_row(prepared: dict[str, Any]) -> dict[str, Any]:
    """Global allocation (--param-ratio 0.5) vs each module cut to 0.5 of its own parameters."""
    problems = [p for _, p, _ in prepared.values()]
    before = sum(p.params(p.bonds) for p in problems)
    glob = allocate(problems, target_params=before // 2)
    uniform = [allocate([p], target_params=p.params(p.bonds) // 2)[0] for p in problems]

    def rms(plan: list[tuple[int, ...]]) -> float:
        errors = [p.error(b) for p, b in zip(problems, plan, strict=True)]
        return math.sqrt(statistics.mean(e * e for e in errors))

    return {
        "benchmark": "allocation at 0.5x MPO params, 36 matrices: RMS of error bounds",
        "threads": None,
        "value": f"global allocation {rms(glob):.3f}",
        "baseline": f"every module cut to 0.5x alone {rms(uniform):.3f}",
        "ratio": rms(glob) / rms(uniform),
        "goal": 1.0,
    }


def _stage_rows(matrices: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    import mposurgeon

    rows = []
    previous = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "decomposed"
        mposurgeon.decompose(minilm_dir(), output=art, layers=["FFN_1", "FFN_2", "attention"])
        floats = [w.float() for w in matrices.values()]

        def svd_all() -> None:
            for w in floats:
                torch.linalg.svd(w, full_matrices=False)

        def stage() -> None:
            mposurgeon.truncate(art, output=Path(tmp) / "cut", overwrite=True, param_ratio=0.5)

        def decompose() -> None:
            mposurgeon.decompose(minilm_dir(), output=Path(tmp) / "again", overwrite=True)

        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                svd, seconds = best_time(svd_all), best_time(stage, 2)
                rows.append(
                    {
                        "benchmark": "truncate stage --param-ratio 0.5, MiniLM (36 modules, I/O)",
                        "threads": threads,
                        "value": f"{seconds:.3f} s",
                        "baseline": f"torch.linalg.svd of the same matrices {svd:.3f} s",
                        "ratio": seconds / svd,
                        "goal": None,
                    }
                )
                dec = best_time(decompose, 2)
                rows.append(
                    {
                        "benchmark": "truncate --param-ratio 0.5 vs decompose, both at default "
                        "options, MiniLM (36 modules, I/O)",
                        "threads": threads,
                        "value": f"truncate {seconds:.3f} s",
                        "baseline": f"decompose {dec:.3f} s",
                        "ratio": seconds / dec,
                        "goal": 1.0,
                    }
                )
        finally:
            torch.set_num_threads(previous)
    return rows
