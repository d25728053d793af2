"""Cost of `train --precision bf16` and `--gradient-checkpointing` against a plain float32 step,
on dense MiniLM (as `full` trains it) and on its MPO artifact as `lightweight` trains it (FFN_1,
FFN_2 and attention as MPO, 36 matrices).

One step = forward + backward + AdamW step on a batch of 16 x 128 random tokens (full attention),
the model, its freezing and its optimizer built as in bench_train. bf16: the forward and the loss
under `torch.autocast(bfloat16)`, which is what accelerate's mixed_precision="bf16" wraps the
prepared model's forward in (weights, gradients and optimizer state stay float32; the loss is
cast back to float32). Gradient checkpointing: the model switched over as
`train --gradient-checkpointing` does it (training.model.enable_gradient_checkpointing:
transformers' activation checkpointing, non-reentrant).

Times: every variant first takes one float32 step (warm-up; it allocates the optimizer state),
then the variants take turns for `repeats` rounds in one process and each keeps its best step.
A variant whose step took over SLOW_RATIO times its mode's float32 step is timed once: on a CPU
without bfloat16 matrix kernels (oneDNN's need AVX512-BF16 or AMX; on AVX2 torch falls back to
a generic gemm) a bf16 step takes tens of seconds, and its noise is small beside that.

Memory: each variant runs in a fresh process, as in bench_train (CPU: resident set, its peak
reset through /proc/self/clear_refs; CUDA: allocated memory): the gradients and the AdamW state
are allocated first (an optimizer step on zero gradients, which moves no weight), then the value
is the peak during one step of the variant minus the memory in use before it. That is what the
options change: the activations kept for backward (with bf16, also the bf16 copies of the
weights autocast makes) and the working memory of forward and backward; gradients and optimizer
state are the same in every variant. The bf16 variant of lightweight is not measured for memory
(one more slow step on such a CPU).
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

from benchmarks.bench_train import BATCH, SEQ, make_batch
from benchmarks.bench_train import build as build_mode
from benchmarks.common import minilm_dir

#: Variant name -> (bf16 autocast, gradient checkpointing); "fp32" is the baseline.
VARIANTS = {
    "fp32": (False, False),
    "bf16": (True, False),
    "checkpointing": (False, True),
}
#: The `train` option of each measured variant, as the rows name it.
FLAGS = {"bf16": "--precision bf16", "checkpointing": "--gradient-checkpointing"}
MODES = ("full", "lightweight")
#: (mode, variant) measured for memory, each in a fresh process.
MEMORY = (
    ("full", "fp32"),
    ("full", "bf16"),
    ("full", "checkpointing"),
    ("lightweight", "fp32"),
    ("lightweight", "checkpointing"),
)
#: A variant whose step takes over SLOW_RATIO times its mode's float32 step is timed once.
SLOW_RATIO = 4.0

CHILD = r"""
import json, sys
from pathlib import Path
from benchmarks.bench_precision import allocate_state, build, step
from benchmarks.bench_train import peak_mb, reset_peak
mode, variant, artifact = sys.argv[1], sys.argv[2], Path(sys.argv[3])
model, optimizer, batch, bf16 = build(mode, variant, artifact)
allocate_state(model, optimizer)
before = reset_peak()
step(model, optimizer, batch, bf16)
print(json.dumps({"growth_mb": peak_mb() - before}))
"""


def build(
    mode: str, variant: str, artifact: Path
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict, bool]:
    """bench_train's classifier, AdamW and BATCH x SEQ batch for `mode`, with `variant`'s
    gradient checkpointing switched on; and whether its steps run under bf16 autocast."""
    from mposurgeon.training.model import enable_gradient_checkpointing

    bf16, checkpointing = VARIANTS[variant]
    model, optimizer, batch = build_mode(mode, artifact)
    if checkpointing:
        enable_gradient_checkpointing(model, minilm_dir() if mode == "full" else artifact)
        on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x
        if not (model.is_gradient_checkpointing if on is None else on):
            raise RuntimeError(f"{mode}: gradient checkpointing did not switch on")
    return model, optimizer, batch, bf16


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool) -> None:
    """One training step; with `bf16`, forward and loss under bfloat16 autocast (accelerate's
    mixed precision), backward and the optimizer step outside it."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.float().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocate_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter a zero gradient and AdamW its state, moving no weight
    (zero gradients, no weight decay): the memory a step keeps from one step to the next."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()


def _step_times(artifact: Path, repeats: int) -> dict[tuple[str, str], float]:
    """Best step time per (mode, variant); all of them take turns, so that load on the machine
    hits each alike."""
    built = {(m, v): build(m, v, artifact) for m in MODES for v in VARIANTS}
    device = str(next(built["full", "fp32"][0].parameters()).device)
    batch = make_batch(SEQ, device)
    for model, optimizer, _, _ in built.values():
        step(model, optimizer, batch, False)  # warm-up; allocates the optimizer state
    best: dict[tuple[str, str], float] = {}
    for _ in range(repeats):
        for key, (model, optimizer, _, bf16) in built.items():
            if key in best and best[key] > SLOW_RATIO * best.get((key[0], "fp32"), best[key]):
                continue
            start = time.perf_counter()
            step(model, optimizer, batch, bf16)
            elapsed = time.perf_counter() - start
            best[key] = min(best.get(key, elapsed), elapsed)
    return best


def _memory(mode: str, variant: str, artifact: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, variant, str(artifact)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {variant} child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mb"]


def run(repeats: int = 4) -> list[dict[str, Any]]:
    import mposurgeon

    device = "CUDA" if torch.cuda.is_available() else _cpu()
    threads = None if torch.cuda.is_available() else torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "dec"
        mposurgeon.decompose(minilm_dir(), output=artifact, layers=["FFN_1", "FFN_2", "attention"])
        times = _step_times(artifact, repeats)
        memory = {(m, v): _memory(m, v, artifact) for m, v in MEMORY}
    whats = {
        "full": f"full (dense MiniLM, batch {BATCH}x{SEQ}, {device})",
        "lightweight": f"lightweight (MiniLM, 36 MPO matrices, batch {BATCH}x{SEQ}, {device})",
    }
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        for variant, flags in FLAGS.items():
            rows.append(
                {
                    "benchmark": f"train step, {whats[mode]}, {flags}",
                    "threads": threads,
                    "value": f"{times[mode, variant]:.3f} s",
                    "baseline": f"fp32 step {times[mode, 'fp32']:.3f} s",
                    "ratio": times[mode, variant] / times[mode, "fp32"],
                    "goal": None,
                }
            )
    for mode, variant in MEMORY:
        if variant == "fp32":
            continue
        rows.append(
            {
                "benchmark": f"train step memory, {whats[mode]}, {FLAGS[variant]}",
                "threads": threads,
                "value": f"{memory[mode, variant]:.0f} MB",
                "baseline": f"fp32 {memory[mode, 'fp32']:.0f} MB",
                "ratio": memory[mode, variant] / memory[mode, "fp32"],
                "goal": None,
            }
        )
    return rows


def _cpu() -> str:
    """The device label: CPU, its vector extension, and whether oneDNN has bf16 kernels."""
    capability = torch.backends.cpu.get_cpu_capability()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return f"CPU {capability}"
    return f"CPU {capability}, no oneDNN bf16"


if __name__ == "__main__":
    for row in run():
        print(row)
