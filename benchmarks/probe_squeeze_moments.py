"""Probe: does carrying AdamW state across a squeeze cut recover better than resetting it?

One squeeze run (MiniLM lossless MPO, overparam, man-sections, 3 epochs, batch 16, 3 cuts by
0.75 of the run) in which each cut core inherits a rescaled optimizer state from the core it
replaces: the step count, a zero first moment and a second moment equal to the old core's mean
(the old moments themselves live in a gauge the cut's canonicalization rotated away). Compare
its accuracy with the `squeeze` rows of `benchmarks/squeeze-runs.jsonl` (fresh moments).

Measured (seed 0, R 0.5): 0.795 carried against 0.798 reset, so `train` resets.

    python -m benchmarks.probe_squeeze_moments RATIO SEED OUTPUT  (about 15 min on one thread)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mposurgeon
from benchmarks.common import man_sections_dir, minilm_dir
from mposurgeon.training import loop, squeeze


def carry_scaled_moments() -> list[int]:
    """Patch the squeeze and the loop so that cut cores inherit rescaled AdamW state; returns
    the list that receives, per optimizer rebuild, how many cores inherited."""
    replaced: dict[nn.Parameter, nn.Parameter] = {}
    carried: list[int] = []
    replace_cores, prepare = squeeze._replace_cores, loop.TrainingRun._prepare

    def _replace_cores(cores: Any, new: list[torch.Tensor]) -> None:
        old = list(cores.core)
        replace_cores(cores, new)
        replaced.update(zip(cores.core, old, strict=True))

    def _prepare(self: Any) -> None:
        old_state = dict(self.optimizer.optimizer.state) if self.optimizer is not None else {}
        prepare(self)
        state, count = self.optimizer.optimizer.state, 0
        for group in self.optimizer.optimizer.param_groups:
            for p in group["params"]:
                old = replaced.get(p)
                if old is not None and old in old_state and p not in state:
                    o = old_state[old]
                    state[p] = {
                        "step": o["step"].clone(),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.full_like(p, float(o["exp_avg_sq"].mean())),
                    }
                    count += 1
        carried.append(count)
        replaced.clear()

    squeeze._replace_cores = _replace_cores  # type: ignore[assignment]
    loop.TrainingRun._prepare = _prepare  # type: ignore[method-assign]
    return carried


def main(ratio: float, seed: int, output: Path) -> dict[str, Any]:
    carried = carry_scaled_moments()
    data = man_sections_dir()
    with tempfile.TemporaryDirectory() as tmp:
        lossless = Path(tmp) / "lossless"
        mposurgeon.decompose(minilm_dir(), output=lossless, layers=["FFN_1", "FFN_2", "attention"])
        result = mposurgeon.train(
            lossless, output=output, method="overparam", epochs=3, batch_size=16, seed=seed,
            data=data / "man-sections-train.jsonl", eval_data=data / "man-sections-eval.jsonl",
            squeeze_to=ratio, squeeze_steps=3,
        )  # fmt: skip
    return {
        "ratio": ratio,
        "seed": seed,
        "moments": "carried, rescaled",
        "cores_carried": carried,
        "eval_accuracy": result.metrics["eval_accuracy"],
        "mpo_params": result.metrics["squeeze"]["final_params"],
    }


if __name__ == "__main__":
    print(json.dumps(main(float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))))
