"""Training-step time and peak memory of `overparam` and `lightweight` relative to `full`
(dense fine-tuning), on MiniLM with FFN_1, FFN_2 and attention as MPO (36 matrices).

One step = forward + backward + AdamW step on a batch of 16 x 128 tokens, through the same
parameter freezing and groups as `train` (training/params.py). Times are the best of several
steps, with the three modes measured in turn in one run. Memory: each mode runs in a fresh
process; the value is the peak during three steps minus the memory in use before them (the
built model): activations, gradients and optimizer state. CPU: resident set, its peak reset
through /proc/self/clear_refs (Linux); CUDA: allocated memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import minilm_dir

MODES = ("full", "overparam", "lightweight")
BATCH, SEQ = 16, 128

CHILD = r"""
import json, sys
from pathlib import Path
import torch
from benchmarks.bench_train import build, peak_mb, reset_peak, step
mode, artifact = sys.argv[1], Path(sys.argv[2])
model, optimizer, batch = build(mode, artifact)
before = reset_peak()
for _ in range(3):
    step(model, optimizer, batch)
print(json.dumps({"growth_mb": peak_mb() - before}))
"""


def reset_peak() -> float:
    """Reset the peak memory counter; return the memory in use now (MB). CUDA: allocated
    memory; CPU: the resident set (the peak is reset through /proc/self/clear_refs)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak memory (MB) since `reset_peak`."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(mode: str, artifact: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """The classifier for `mode` (dense MiniLM for full, the MPO artifact otherwise), its
    AdamW over the mode's trainable parameters, and a seeded batch of BATCH x SEQ tokens."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from mposurgeon.stages.load import load_model
    from mposurgeon.training.params import parameter_groups, set_trainable

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if mode == "full":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    else:
        config = AutoConfig.from_pretrained(artifact, num_labels=2)
        model = load_model(artifact, "sequence-classification", config=config)
    model = model.to(device).train()
    set_trainable(model, mode)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-5, mpo_lr=None, weight_decay=0))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, optimizer, {k: v.to(device) for k, v in batch.items()}


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_times(artifact: Path, repeats: int) -> dict[str, float]:
    """Best step time per mode; the modes take turns so that load on the machine hits all."""
    built = {mode: build(mode, artifact) for mode in MODES}
    for args in built.values():
        step(*args)  # warm-up
    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(repeats):
        for mode, args in built.items():
            start = time.perf_counter()
            step(*args)
            best[mode] = min(best[mode], time.perf_counter() - start)
    return best


def _memory(mode: str, artifact: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(artifact)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mb"]


def run(repeats: int = 5) -> list[dict[str, Any]]:
    import mposurgeon

    device = "CUDA" if torch.cuda.is_available() else "CPU"
    threads = None if device == "CUDA" else torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "dec"
        mposurgeon.decompose(minilm_dir(), output=artifact, layers=["FFN_1", "FFN_2", "attention"])
        times = _step_times(artifact, repeats)
        memory = {mode: _memory(mode, artifact) for mode in MODES}
    what = f"MiniLM, 36 MPO matrices, batch {BATCH}x{SEQ}, {device}"
    for mode in ("overparam", "lightweight"):
        rows.append(
            {
                "benchmark": f"train step, {mode} ({what})",
                "threads": threads,
                "value": f"{times[mode]:.3f} s",
                "baseline": f"full (dense) step {times['full']:.3f} s",
                "ratio": times[mode] / times["full"],
                "goal": 1.3 if mode == "overparam" else None,
            }
        )
    for mode in ("overparam", "lightweight"):
        rows.append(
            {
                "benchmark": f"train step memory, {mode} ({what})",
                "threads": threads,
                "value": f"{memory[mode]:.0f} MB",
                "baseline": f"full (dense) {memory['full']:.0f} MB",
                "ratio": memory[mode] / memory["full"],
                "goal": None,
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
