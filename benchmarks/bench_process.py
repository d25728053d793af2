"""Whole processes: `mposurgeon decompose` of MiniLM vs a script that loads the same weights
and runs torch.linalg.svd on the same 36 matrices; and `mposurgeon --help` start-up."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import minilm_dir

SVD_SCRIPT = r"""
import sys, torch
from safetensors import safe_open
names = ("attention.self.query", "attention.self.key", "attention.self.value",
         "attention.output.dense", "intermediate.dense", "output.dense")
with safe_open(sys.argv[1] + "/model.safetensors", "pt") as f:
    for key in f.keys():
        if key.endswith(".weight") and any(n + ".weight" in key for n in names):
            torch.linalg.svd(f.get_tensor(key), full_matrices=False)
"""


def _wall(cmd: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def run() -> list[dict[str, Any]]:
    model = str(minilm_dir())
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "o")
        ours = _wall(
            [
                sys.executable,
                "-m",
                "mposurgeon",
                "decompose",
                model,
                "-o",
                out,
                "--overwrite",
                "-q",
                "--layers",
                "FFN_1,FFN_2,attention",
            ]
        )
    svd = _wall([sys.executable, "-c", SVD_SCRIPT, model])
    bare = _wall([sys.executable, "-c", "pass"], 5)
    help_time = _wall([sys.executable, "-m", "mposurgeon", "--help"], 5)
    return [
        {
            "benchmark": "decompose MiniLM (36 matrices), whole process",
            "threads": None,
            "value": f"{ours:.2f} s",
            "baseline": f"process: load + torch.linalg.svd of the same matrices {svd:.2f} s",
            "ratio": ours / svd,
            "goal": 1.2,
        },
        {
            "benchmark": "`mposurgeon --help` start-up (goal < 0.3 s absolute)",
            "threads": None,
            "value": f"{help_time:.3f} s",
            "baseline": f"bare `python -c pass` {bare:.3f} s",
            "ratio": help_time / bare,
            "goal": None,
        },
    ]
