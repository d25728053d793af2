"""Factorized inference: tokens/s of `load_model` at MPO parameter ratios 1.0, 0.5 and 0.3
against the dense model, at batch 1 and 32.

For each model, in a temporary directory: `decompose` at defaults (FFN_1, FFN_2 and attention,
lossless: MPO parameter ratio 1.0), `truncate --param-ratio R` of that for R = 0.5 and 0.3,
then a forward of `load_model(artifact, task="base")` (forward_mode "auto") on random token ids
of `SEQ` tokens per sequence, all attended, under torch.inference_mode. The baseline is
`AutoModel.from_pretrained` of the same checkpoint (the same class, without a head). The two
forwards run in turn, best of `rounds_for(batch)` rounds after a warm-up each, so that a slow
spell of the shared machine hits both alike. tokens/s = batch x `SEQ` / seconds; ratio = MPO
tokens/s / dense tokens/s (above 1: factorized inference is faster). At most `MAX_THREADS`
torch threads. Models:

- the shipped MiniLM (all-MiniLM-L6-v2, BERT, hidden 384, 6 layers, float32);
- a Llama-shaped LM of `LLAMA_LAYERS` layers of TinyLlama-1.1B's shapes (hidden 2048,
  intermediate 5632, 32 heads, 4 key-value heads, vocab 32000), random weights, float32 by
  default (`--dtype bfloat16`: a bf16 checkpoint, whose cores decompose keeps in float32).

"auto" picks per layer and call, by multiply-add count, between contracting the input through
the cores and rebuilding the dense weight (`MPOLinear.chosen_mode`). Each row says what it
chose, counted per weight group, and checks the choice: one layer of each (group, shape) is
timed in both modes on the same rows (batch x `SEQ`); a pick more than `SLOWER` times the
faster mode's time is reported in the row ("auto picked the slower path"). A mode that needs
more than `SKIP_MACS` times the multiply-adds of the pick is not timed (contracting a lossless
MPO of MiniLM's FFN on 4096 rows takes seconds, 250x rebuilding it).

`python -m benchmarks.bench_inference` prints the rows as JSON lines (`--models minilm` or
`llama`, `--dtype`, `--layers`, `--ratios`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.common import minilm_dir

#: Tokens per sequence.
SEQ = 128
#: Sequences per forward.
BATCHES = (1, 32)
#: MPO parameter ratios: 1.0 is the lossless decomposition, the others `truncate` it.
RATIOS = (1.0, 0.5, 0.3)
#: Layers of the Llama-shaped model.
LLAMA_LAYERS = 2
#: Most torch threads the suite uses (the machine is shared).
MAX_THREADS = 2
#: A pick of "auto" this many times slower than the other mode is reported.
SLOWER = 1.2
#: A forward mode needing this many times the multiply-adds of auto's pick is not timed.
SKIP_MACS = 8.0
#: Timed rounds of each layer check.
CHECK_ROUNDS = 5

Mode = Literal["contract", "reconstruct"]
MODES: tuple[Mode, ...] = ("contract", "reconstruct")


@dataclass(frozen=True)
class LayerCheck:
    """One MPO linear layer timed in each forward mode on `rows` input rows.

    `chosen`: the mode "auto" picks for `rows`; `macs`: multiply-adds per mode; `seconds`:
    best wall time (s) per mode, None for a mode not timed (more than `SKIP_MACS` times the
    multiply-adds of the chosen one).
    """

    name: str
    group: str
    shape: tuple[int, int]  # (out_features, in_features)
    rows: int
    chosen: Mode
    macs: Mapping[Mode, int]
    seconds: Mapping[Mode, float | None]

    @property
    def faster(self) -> Mode:
        """The timed mode that took less time."""
        timed = [m for m in MODES if self.seconds.get(m) is not None]
        return min(timed, key=lambda m: self.seconds[m] or 0.0)

    @property
    def slowdown(self) -> float:
        """The chosen mode's time over the faster mode's (1.0: auto picked the faster)."""
        return (self.seconds[self.chosen] or 0.0) / (self.seconds[self.faster] or 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "group": self.group,
            "shape": list(self.shape),
            "rows": self.rows,
            "chosen": self.chosen,
            "macs": dict(self.macs),
            "ms": {m: None if s is None else round(s * 1e3, 3) for m, s in self.seconds.items()},
        }


def describe_modes(counts: Mapping[str, Mapping[str, int]]) -> str:
    """`counts` (group -> mode -> number of layers) in words, groups in the given order, e.g.
    "attention 24 contract, FFN_1 3 contract + 3 reconstruct"; "none" if empty."""
    parts = []
    for group, by_mode in counts.items():
        modes = [f"{by_mode[m]} {m}" for m in MODES if by_mode.get(m)]
        if modes:
            parts.append(f"{group} {' + '.join(modes)}")
    return ", ".join(parts) or "none"


def describe_checks(checks: Sequence[LayerCheck], slower: float = SLOWER) -> str:
    """Whether "auto" picked the faster mode of each checked layer, in words: the picks more
    than `slower` times the faster mode's time, with both times, or that there are none (and
    how many layers had the other mode untimed, it needing > `SKIP_MACS`x the multiply-adds)."""
    bad = [c for c in checks if c.slowdown > slower]
    if bad:
        return "auto picked the slower path: " + "; ".join(
            f"{c.group} {c.shape[0]}x{c.shape[1]} {c.chosen} "
            f"{(c.seconds[c.chosen] or 0.0) * 1e3:.1f} ms vs {c.faster} "
            f"{(c.seconds[c.faster] or 0.0) * 1e3:.1f} ms"
            for c in bad
        )
    untimed = sum(any(s is None for s in c.seconds.values()) for c in checks)
    text = f"auto's pick within {slower}x of the faster mode for all {len(checks)} layer shapes"
    if untimed:
        text += f", the other mode untimed for {untimed} (> {SKIP_MACS:g}x the multiply-adds)"
    return text


def mpo_linears(model: nn.Module) -> dict[str, Any]:
    """The model's `MPOLinear` layers by live name."""
    from mposurgeon.models.layers import MPOLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, MPOLinear)}


def _group(model: nn.Module, name: str) -> str:
    from mposurgeon.models.groups import group_of

    return group_of(model, name) or "other"


def mode_counts(model: nn.Module, rows: int) -> dict[str, Counter[str]]:
    """How many MPO layers of each weight group "auto" evaluates by each mode for a call of
    `rows` input rows (tokens), groups in model order (embeddings: `rows` looked-up rows)."""
    from mposurgeon.models.layers import MPOEmbedding, MPOLinear

    counts: dict[str, Counter[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (MPOLinear, MPOEmbedding)):
            counts.setdefault(_group(model, name), Counter())[module.chosen_mode(rows)] += 1
    return counts


def layer_macs(layer: Any, rows: int) -> dict[Mode, int]:
    """Multiply-adds of an `MPOLinear` on `rows` input rows, per forward mode (reconstruct:
    rebuilding the weight, then the dense product)."""
    from mposurgeon.mpo.contract import contract_flops, reconstruct_flops

    cores = layer.mpo.cores
    product = rows * layer.out_features * layer.in_features
    return {
        "contract": contract_flops(cores, rows),
        "reconstruct": reconstruct_flops(cores) + product,
    }


def macs(model: nn.Module, rows: int) -> tuple[int, int]:
    """Multiply-adds of the MPO linear layers for `rows` input rows: (what "auto" picks, the
    dense products of the same layers)."""
    picked = dense = 0
    for layer in mpo_linears(model).values():
        picked += layer_macs(layer, rows)[layer.chosen_mode(rows)]
        dense += rows * layer.out_features * layer.in_features
    return picked, dense


def interleaved_best(
    fns: Sequence[Callable[[], object]], rounds: int, stop_ratio: float | None = None
) -> list[float]:
    """Best wall time (s) of each of `fns`, run in turn `rounds` times after one warm-up each,
    so that a slow spell of a shared machine hits all alike. With `stop_ratio` and two `fns`:
    stop after the first round if the second took more than `stop_ratio` times the first
    (more rounds would not bring them near each other)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for round_ in range(rounds):
        for i, fn in enumerate(fns):
            gc.collect()
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
        past = stop_ratio is not None and len(fns) == 2 and best[1] > stop_ratio * best[0]
        if round_ == 0 and past:
            break
    return best


def check_layers(model: nn.Module, rows: int, dtype: torch.dtype) -> list[LayerCheck]:
    """The first MPO linear layer of each (group, shape), timed in each forward mode on `rows`
    random input rows of `dtype`, with what "auto" picks: both modes interleaved, best of
    `CHECK_ROUNDS` after a warm-up, stopped after one round if the other mode took more than
    2 x `SLOWER` times the pick; the other mode not timed if it needs more than `SKIP_MACS`
    times the pick's multiply-adds."""
    seen: set[tuple[str, int, int]] = set()
    checks = []
    for name, layer in mpo_linears(model).items():
        group = _group(model, name)
        key = (group, layer.out_features, layer.in_features)
        if key in seen:
            continue
        seen.add(key)
        x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0))
        x = x.to(dtype)
        chosen, before = layer.chosen_mode(rows), layer.forward_mode
        other: Mode = "reconstruct" if chosen == "contract" else "contract"
        counts = layer_macs(layer, rows)
        seconds: dict[Mode, float | None] = {chosen: None, other: None}
        timed = [chosen] if counts[other] > SKIP_MACS * counts[chosen] else [chosen, other]
        fns = [_forward_in(layer, x, mode) for mode in timed]
        try:
            with torch.inference_mode():
                times = interleaved_best(fns, CHECK_ROUNDS, stop_ratio=2 * SLOWER)
        finally:
            layer.forward_mode = before
        seconds.update(zip(timed, times, strict=True))
        checks.append(LayerCheck(name, group, key[1:], rows, chosen, counts, seconds))
    return checks


def _forward_in(layer: nn.Module, x: torch.Tensor, mode: Mode) -> Callable[[], object]:
    """A call of `layer(x)` in forward mode `mode` (set on each call)."""

    def forward() -> object:
        layer.forward_mode = mode
        return layer(x)

    return forward


def token_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (batch, seq) in [0, vocab) and an all-ones attention mask."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def rounds_for(batch: int) -> int:
    """Timed rounds per forward: fewer for the large batch (seconds per forward on 2 cores)."""
    return 10 if batch == 1 else 3


def llama_checkpoint(directory: Path, layers: int, dtype: str = "float32") -> Path:
    """A Llama-shaped causal LM (TinyLlama-1.1B's shapes, `layers` layers) of random `dtype`
    weights saved by transformers in `directory`; built in a child process so that its memory
    is given back."""
    script = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, layers, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
model = LlamaForCausalLM._from_config(config, dtype=dtype)
model.save_pretrained(out)
"""
    subprocess.run(
        [sys.executable, "-c", script, str(directory), str(layers), dtype],
        check=True,
        capture_output=True,
    )
    return directory


def model_rows(
    label: str,
    src: Path,
    work: Path,
    ratios: Sequence[float] = RATIOS,
    batches: Sequence[int] = BATCHES,
    seq: int = SEQ,
) -> Iterator[dict[str, Any]]:
    """One row per (ratio, batch): tokens/s of `load_model` of `src` decomposed (and truncated
    to the ratio) vs the dense model, with the modes "auto" picked and their check."""
    from transformers import AutoConfig, AutoModel

    import mposurgeon
    from mposurgeon.artifact.manifest import read_manifest

    vocab = AutoConfig.from_pretrained(src).vocab_size
    inputs = {b: token_batch(b, seq, vocab) for b in batches}
    dense = AutoModel.from_pretrained(src, dtype="auto").eval()
    lossless = work / "dec"
    mposurgeon.decompose(src, output=lossless)
    for ratio in ratios:
        art = lossless
        if ratio != 1.0:
            art = work / f"ratio-{ratio}"
            mposurgeon.truncate(lossless, output=art, param_ratio=ratio)
        records = read_manifest(art).modules.values()
        mpo_share = sum(r.params for r in records) / sum(r.dense_params for r in records)
        model = mposurgeon.load_model(art, task="base")
        for b in batches:
            rows = b * seq
            with torch.inference_mode():
                mpo_s, dense_s = interleaved_best(
                    [partial(model, **inputs[b]), partial(dense, **inputs[b])],
                    rounds_for(b),
                )
            tps, dense_tps = rows / mpo_s, rows / dense_s
            counts = mode_counts(model, rows)
            checks = check_layers(model, rows, dense.dtype)
            picked, dense_macs = macs(model, rows)
            yield {
                "benchmark": f"load_model tokens/s, {label}, MPO params {ratio}x of lossless "
                f"({mpo_share:.2f}x the dense matrices), batch {b} x {seq}; auto: "
                f"{describe_modes(counts)}",
                "threads": torch.get_num_threads(),
                "value": f"{tps:.0f} tokens/s ({describe_checks(checks)})",
                "baseline": f"dense {type(dense).__name__} {dense_tps:.0f} tokens/s",
                "ratio": tps / dense_tps,
                "goal": None,
                "model": label,
                "param_ratio": ratio,
                "mpo_params_vs_dense": round(mpo_share, 4),
                "batch": b,
                "seq": seq,
                "tokens_per_s": round(tps, 1),
                "dense_tokens_per_s": round(dense_tps, 1),
                "macs_vs_dense": round(picked / dense_macs, 4),
                "modes": {g: dict(c) for g, c in counts.items()},
                "layer_checks": [c.as_dict() for c in checks],
            }
        del model
        gc.collect()
        if art != lossless:
            shutil.rmtree(art, ignore_errors=True)


def minilm_rows(ratios: Sequence[float] = RATIOS) -> Iterator[dict[str, Any]]:
    """`model_rows` of the shipped MiniLM."""
    with tempfile.TemporaryDirectory() as tmp:
        label = "MiniLM (BERT, 6 layers, float32)"
        yield from model_rows(label, minilm_dir(), Path(tmp), ratios)


def llama_rows(
    layers: int = LLAMA_LAYERS, dtype: str = "float32", ratios: Sequence[float] = RATIOS
) -> Iterator[dict[str, Any]]:
    """`model_rows` of a Llama-shaped checkpoint of `layers` layers of `dtype` weights."""
    with tempfile.TemporaryDirectory() as tmp:
        src = llama_checkpoint(Path(tmp) / "llama", layers, dtype)
        label = f"Llama-shaped (TinyLlama shapes, {layers} layers, random {dtype})"
        yield from model_rows(label, src, Path(tmp), ratios)


def _threads(most: int = MAX_THREADS) -> int:
    """Cap torch's threads at `most`; return the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(most, previous))
    return previous


def run() -> list[dict[str, Any]]:
    previous = _threads()
    try:
        return [*minilm_rows(), *llama_rows()]
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m benchmarks.bench_inference`: the rows as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["minilm", "llama"], default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--layers", type=int, default=LLAMA_LAYERS, help="Llama-shaped layers")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    args = parser.parse_args(argv)
    models = args.models or ["minilm", "llama"]
    _threads()
    if "minilm" in models:
        for row in minilm_rows(args.ratios):
            print(json.dumps(row), flush=True)
    if "llama" in models:
        for row in llama_rows(args.layers, args.dtype, args.ratios):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
