"""Scale to real LLM checkpoints: time and memory of each stage on Llama-shaped checkpoints.

Issue 17's acceptance table. For Llama-shaped checkpoints of 8 and 22 layers (TinyLlama-1.1B's
shapes: hidden 2048, intermediate 5632, vocab 32000; random bfloat16 weights; saved by
transformers in shards of at most 500 MB, as TinyLlama's five ~494 MB shards; 2.2 GB at 22
layers), built one at a time in a temporary directory, every stage runs at default options in
a fresh child process (`bench_memory.measure`) and is reported:

- its private and resident peak against the bound: the largest input shard plus 3x the
  largest decomposed matrix in float32 (goal: within it), for decompose, truncate
  (`param_ratio=0.5`), merge, select (magnitude and entropy) and inspect;
- truncate's time against decompose's (goal: at most 1.0x) and merge's against a
  shard-by-shard safetensors load and save of the same artifact (goal: 1.5x), both whole
  process (the imports excepted: every child has them before the clock starts), for merge of
  the decomposition and of its truncation (the pipeline's merge); beside them, the
  decomposition's contraction alone (every module's cores contracted, nothing read back or
  written): merge's arithmetic floor against the same copy;
- each stage's private peak at 22 layers against 8 (goal: the same, within 1.1x).

With a GPU (`torch.cuda.is_available()`) decompose, truncate and merge run again with
`device="cuda"` (the CPU rows then pass `device="cpu"`, since the default would pick the
GPU), with the GPU's allocated peak; without one a row says the CUDA rows were skipped.

`python -m benchmarks.bench_scale --layers 8 22` prints the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_memory import (
    RUN_CAP_MB,
    largest_matrix_f32_mb,
    largest_shard_mb,
    llama_checkpoint,
    measure,
    peak_row,
    remove,
    total_mb,
)

#: The checkpoints measured (numbers of layers) and their shard size.
LAYERS = (8, 22)
SHARD = "500MB"

DECOMPOSE = "decompose"
TRUNCATE = "truncate --param-ratio 0.5"
MERGE = "merge"
COPY = "copy of the decomposition"
CONTRACT = "contraction alone of the decomposition"
MERGE_TRUNCATED = "merge of the truncated artifact"
COPY_TRUNCATED = "copy of the truncated artifact"
#: What each input name of `Step.reads` is: the checkpoint, its decomposition, its truncation.
INPUTS = ("src", "dec", "trunc")


@dataclass(frozen=True)
class Step:
    """One stage run: its row `name`, `measure`'s `stage`, the input it `reads` ("src": the
    checkpoint, "dec": its decomposition at defaults, "trunc": that truncated to half its
    parameters) and its keyword arguments. `matrices`: whether the stage handles decomposed
    matrices (its bound has 3x the largest; a copy's does not)."""

    name: str
    stage: str
    reads: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    matrices: bool = True


def steps(device: str | None) -> list[Step]:
    """The stages run on each checkpoint, decompose first (the others read its output).

    `device` None: the defaults (every stage, the CPU without a GPU); "cpu" or "cuda": that
    device for decompose, truncate and merge, and only those (and the copy) on "cuda"."""
    dev = {} if device is None else {"device": device}
    plan = [
        Step(DECOMPOSE, "decompose", "src", dict(dev)),
        Step(COPY, "copy", "dec", {}, matrices=False),
        Step(MERGE, "merge", "dec", dict(dev)),
        Step(TRUNCATE, "truncate", "dec", {"param_ratio": 0.5, **dev}),
        Step(COPY_TRUNCATED, "copy", "trunc", {}, matrices=False),
        Step(MERGE_TRUNCATED, "merge", "trunc", dict(dev)),
    ]
    if device is None or device == "cpu":
        plan.insert(3, Step(CONTRACT, "contract", "dec", {}))
    if device == "cuda":
        return plan
    return plan + [
        Step("select --method magnitude", "select", "src", {"method": "magnitude", "top_n": 1}),
        Step("select --method entropy", "select", "src", {"method": "entropy", "top_n": 1}),
        Step("inspect", "inspect", "dec"),
    ]


def run_steps(
    src: Path, work: Path, plan: Sequence[Step], label: str, cap_mb: float | None
) -> Iterator[tuple[Step, dict[str, Any], dict[str, Any]]]:
    """Each step of `plan` on checkpoint `src`, outputs under `work` (each deleted once
    measured, the decomposition and its truncation last): the step, `measure`'s result and its
    peak row."""
    inputs = {"src": src, "dec": work / "dec", "trunc": work / "trunc"}
    kept = {"decompose": inputs["dec"], "truncate": inputs["trunc"]}  # what later steps read
    matrix_mb: float | None = None
    for step in plan:
        inp = inputs[step.reads]
        if step.reads != "src" and not (inp / "mposurgeon.json").is_file():
            continue  # the stage that makes it was killed (cap_mb): nothing to read
        out = kept.get(step.stage, work / "out")
        m = measure(step.stage, inp, out, step.kwargs, cap_mb)
        if step.stage == "decompose" and (out / "mposurgeon.json").is_file():
            matrix_mb = largest_matrix_f32_mb(out)
        bound_matrix = (matrix_mb or 0.0) if step.matrices else None
        row = peak_row(step.name, m, largest_shard_mb(inp), bound_matrix, label, cap_mb)
        if out not in kept.values():
            remove(out)
        yield step, m, row
    for out in kept.values():
        remove(out)


def _seconds(m: dict[str, Any] | None) -> str:
    """A measured time, or why there is none."""
    if m is None:
        return "not run (the stage making its input was killed)"
    if m["capped"]:
        return f"killed after {m['seconds']:.0f} s"
    return f"{m['seconds']:.1f} s"


def time_rows(found: dict[str, dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Truncate against decompose (goal 1.0x), each merge against a copy of its input (goal
    1.5x) and the contraction alone against that copy (merge's floor: no goal), from one
    checkpoint's measurements by step name (`measure`'s results)."""
    pairs = [
        (TRUNCATE, DECOMPOSE, "decompose", 1.0),
        (MERGE, COPY, "shard-by-shard safetensors copy of the decomposition", 1.5),
        (CONTRACT, COPY, "shard-by-shard safetensors copy of the decomposition", None),
        (MERGE_TRUNCATED, COPY_TRUNCATED, "shard-by-shard safetensors copy of it", 1.5),
    ]
    rows = []
    for name, base, base_label, goal in pairs:
        m, b = found.get(name), found.get(base)
        ok = m is not None and b is not None and not m["capped"] and not b["capped"]
        rows.append(
            {
                "benchmark": f"time of {name} at defaults, whole process, {label}",
                "stage": name,
                "threads": torch.get_num_threads(),
                "value": _seconds(m),
                "baseline": f"{base_label} {_seconds(b)}",
                "ratio": m["seconds"] / b["seconds"] if ok else None,
                "goal": goal,
            }
        )
    return rows


def _peak(m: dict[str, Any]) -> str:
    """A measured private peak (MB), or the size at which the stage was killed."""
    killed = " (killed past the cap)" if m["capped"] else ""
    return f"{m['private_mb']:.0f} MB{killed}"


def same_peak_rows(
    by_layers: dict[int, dict[str, dict[str, Any]]], variant: str
) -> list[dict[str, Any]]:
    """Per stage (the copies and the contraction, baselines, left out), the private peak on
    the most layers against the fewest (goal: the same, within 1.1x), from measurements by
    number of layers, then step name."""
    if len(by_layers) < 2:
        return []
    few, many = min(by_layers), max(by_layers)
    rows = []
    for name, small in by_layers[few].items():
        large = by_layers[many].get(name)
        if large is None or name in (COPY, COPY_TRUNCATED, CONTRACT):  # baselines
            continue
        ok = not small["capped"] and not large["capped"]
        rows.append(
            {
                "benchmark": f"private peak of {name} at defaults, {many} vs {few} layers, "
                f"{variant}",
                "stage": name,
                "threads": torch.get_num_threads(),
                "value": _peak(large),
                "baseline": _peak(small),
                "ratio": large["private_mb"] / max(small["private_mb"], 1.0) if ok else None,
                "goal": 1.1,
            }
        )
    return rows


def skipped_cuda_row() -> dict[str, Any]:
    """The row standing for the CUDA rows on a machine without a GPU."""
    return {
        "benchmark": f'{DECOMPOSE}, {TRUNCATE} and {MERGE} with device="cuda"',
        "threads": torch.get_num_threads(),
        "value": "skipped: no GPU (torch.cuda.is_available() is False)",
        "baseline": "-",
        "ratio": None,
        "goal": None,
    }


def scale_rows(
    layers: Sequence[int] = LAYERS,
    shard: str = SHARD,
    cap_mb: float | None = RUN_CAP_MB,
    cuda: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """The suite's rows for Llama-shaped checkpoints of each number of `layers`, shards of at
    most `shard`; a stage past `cap_mb` resident is killed (reported, not run on). `cuda`
    None: the CUDA rows when a GPU is available."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    variants = [("cpu", "cpu" if cuda else None)] + ([("cuda", "cuda")] if cuda else [])
    measured: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for n in layers:
            src = llama_checkpoint(t / f"llama-{n}", n, shard)
            files = len(list(src.glob("*.safetensors")))
            label = (
                f"Llama-shaped, {n} layers ({total_mb(src):.0f} MB bf16 in {files} "
                f"shard{'s' if files != 1 else ''} of <= {shard})"
            )
            for variant, device in variants:
                work = t / variant
                work.mkdir()
                found = measured.setdefault(variant, {}).setdefault(n, {})
                for step, m, row in run_steps(
                    src, work, steps(device), f"{label}, {variant}", cap_mb
                ):
                    found[step.name] = m
                    yield row
                yield from time_rows(found, f"{label}, {variant}")
                remove(work)
            remove(src)  # one checkpoint on disk at a time
    for variant, by_layers in measured.items():
        yield from same_peak_rows(by_layers, variant)
    if not cuda:
        yield skipped_cuda_row()


def run() -> list[dict[str, Any]]:
    """The `scale` suite at its defaults: 8 and 22 layers, 500 MB shards."""
    return list(scale_rows())


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m benchmarks.bench_scale`: the suite's rows as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    parser.add_argument("--shard", default=SHARD, help="the checkpoint's max_shard_size")
    parser.add_argument(
        "--cap-gb",
        type=float,
        default=RUN_CAP_MB / 1024,
        help="kill a stage past this resident size (GB)",
    )
    args = parser.parse_args(argv)
    for row in scale_rows(args.layers, args.shard, args.cap_gb * 1024):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
