"""Training-step time and peak memory of `overparam` and `lightweight` relative to `full`
(dense fine-tuning), on MiniLM with FFN_1, FFN_2 and attention as MPO (36 matrices).

One step = forward + backward + AdamW step on a batch of 16 x 128 tokens (and 16 x 32), through
the same parameter freezing and groups as `train` (training/params.py). Times are the best of
several steps, with the three modes measured in turn in one run. An MPO layer rebuilds its dense
weight every step (forward and backward): a cost that does not grow with the batch, so it
weighs more on short sequences. Memory: each mode runs in a fresh
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
#: Sequence lengths timed: typical fine-tuning length, and short sentences (the demo data's),
#: where rebuilding the dense weights weighs more against the smaller matrix products.
SEQS = (SEQ, 32)

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

    from mposurgeon.artifact.load import load_model
    from mposurgeon.methods.registry import get_method

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if mode == "full":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    else:
        config = AutoConfig.from_pretrained(artifact, num_labels=2)
        model = load_model(artifact, "sequence-classification", config=config)
    model = model.to(device).train()
    method = get_method(mode)
    method.set_trainable(model)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, weight_decay=0))
    return model, optimizer, make_batch(SEQ, device)


def make_batch(seq: int, device: str) -> dict[str, torch.Tensor]:
    """A seeded batch of BATCH rows of `seq` random tokens, with labels."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, seq), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_times(artifact: Path, repeats: int) -> dict[tuple[str, int], float]:
    """Best step time per (mode, sequence length); the modes take turns, so that load on the
    machine hits all of them."""
    built = {mode: build(mode, artifact) for mode in MODES}
    device = str(next(built["full"][0].parameters()).device)
    best: dict[tuple[str, int], float] = {}
    for seq in SEQS:
        batch = make_batch(seq, device)
        for model, optimizer, _ in built.values():
            step(model, optimizer, batch)  # warm-up
        for _ in range(repeats):
            for mode, (model, optimizer, _) in built.items():
                start = time.perf_counter()
                step(model, optimizer, batch)
                elapsed = time.perf_counter() - start
                best[mode, seq] = min(best.get((mode, seq), elapsed), elapsed)
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
    for seq in SEQS:
        what = f"MiniLM, 36 MPO matrices, batch {BATCH}x{seq}, {device}"
        for mode in ("overparam", "lightweight"):
            rows.append(
                {
                    "benchmark": f"train step, {mode} ({what})",
                    "threads": threads,
                    "value": f"{times[mode, seq]:.3f} s",
                    "baseline": f"full (dense) step {times['full', seq]:.3f} s",
                    "ratio": times[mode, seq] / times["full", seq],
                    "goal": 1.3 if mode == "overparam" and seq == SEQ else None,
                }
            )
    what = f"MiniLM, 36 MPO matrices, batch {BATCH}x{SEQ}, {device}"
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
