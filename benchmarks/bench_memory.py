"""Peak memory of decompose and merge, and merge time, against plain safetensors copies.

Each measured job runs in a fresh process. Memory is the growth of the peak resident set after
the imports (on Linux the high-water mark `VmHWM`, reset after the imports through
/proc/self/clear_refs, minus the resident set then), compared with the largest shard; and of
that, the private part (`RssAnon`, sampled every millisecond), i.e. without the pages of the
memory-mapped input, which the kernel may drop at will. A streaming stage holds the mapped
input shard, the output shard being built and its working set, whatever the checkpoint's total
size: the synthetic BERT-shaped checkpoints of random weights in 250 MB shards, ~1 GB and ~2 GB,
show the same growth. The shipped MiniLM is one 90 MB file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import best_time, minilm_dir

CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
mode, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import torch, transformers, safetensors.torch as st  # the same imports in every mode
import mposurgeon, mposurgeon.stages.decompose, mposurgeon.stages.merge
from mposurgeon.artifact.tensors import open_tensors, ShardedWriter

def peak_mb():
    try:  # Linux: the high-water mark since the last reset
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def status_mb(field):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None

def current_mb():
    return status_mb("VmRSS") or peak_mb()

anon_peak, done = [0.0], threading.Event()
def sample_anon():  # private memory only (no mapped file pages), every millisecond
    while not done.is_set():
        anon_peak[0] = max(anon_peak[0], status_mb("RssAnon") or 0.0)
        time.sleep(0.001)

if mode == "decompose":  # find the targets first: the modeling import is not streaming memory
    from mposurgeon.stages.common import model_layout
    model_layout(src)
try:  # reset the high-water mark to the current RSS, so import-time peaks do not hide growth
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before, anon_before = current_mb(), status_mb("RssAnon") or 0.0
sampler = threading.Thread(target=sample_anon, daemon=True)
sampler.start()
if mode == "copy":  # plain streaming copy, shard by shard: the floor
    out.mkdir(parents=True)
    with open_tensors(src) as reader, ShardedWriter(out, 250 * 10**6) as writer:
        for key in reader.keys():
            writer.add(key, reader.get(key))
elif mode == "decompose":
    mposurgeon.decompose(src, output=out, layers=["FFN_1", "FFN_2", "attention"],
                         max_shard_size="250MB")
elif mode == "merge":
    mposurgeon.merge(src, output=out, max_shard_size="250MB")
after = peak_mb()
done.set()
sampler.join()
anon = anon_peak[0] - anon_before
print(json.dumps({"growth_mb": after - before, "peak_mb": after, "anon_growth_mb": anon}))
"""


def _child(mode: str, src: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_checkpoint(directory: Path, layers: int = 40, hidden: int = 1024) -> Path:
    """A BERT-shaped checkpoint of random float32 weights (~50 MB per layer), 250 MB shards."""
    from transformers import BertConfig

    from mposurgeon.artifact.tensors import ShardedWriter

    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=4 * hidden,
        architectures=["BertModel"],
    )
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (1000, hidden),
        "embeddings.position_embeddings.weight": (512, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + name + ".bias"] = (hidden,)
        shapes[p + "attention.output.LayerNorm.weight"] = (hidden,)
        shapes[p + "attention.output.LayerNorm.bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (4 * hidden, hidden)
        shapes[p + "intermediate.dense.bias"] = (4 * hidden,)
        shapes[p + "output.dense.weight"] = (hidden, 4 * hidden)
        shapes[p + "output.dense.bias"] = (hidden,)
        shapes[p + "output.LayerNorm.weight"] = (hidden,)
        shapes[p + "output.LayerNorm.bias"] = (hidden,)
    with ShardedWriter(directory, 250 * 10**6) as writer:
        for key, shape in shapes.items():
            writer.add(key, torch.randn(shape, generator=generator) * 0.02)
    return directory


def _largest_shard_mb(directory: Path) -> float:
    return max(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6


def _total_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        sources = {
            "MiniLM": minilm_dir(),
            "synthetic": synthetic_checkpoint(t / "synthetic", layers=40),
            "synthetic, half the layers": synthetic_checkpoint(t / "synthetic-half", layers=20),
        }
        artifacts = {}
        for label, src in sources.items():
            art = artifacts[label] = t / f"{src.name}-dec"
            floor = _child("copy", src, t / f"{src.name}-copy")
            dec = _child("decompose", src, art)
            merged = _child("merge", art, t / f"{src.name}-merged")
            shard = _largest_shard_mb(src)
            for what, m in (
                ("plain shard-by-shard copy", floor),
                ("decompose", dec),
                ("merge", merged),
            ):
                rows.append(
                    {
                        "benchmark": f"peak memory growth of {what}, {label} "
                        f"({_total_mb(src):.0f} MB, largest shard {shard:.0f} MB)",
                        "threads": None,
                        "value": f"{m['growth_mb']:.0f} MB "
                        f"(private {m['anon_growth_mb']:.0f} MB = "
                        f"{m['anon_growth_mb'] / shard:.2f}x the shard)",
                        "baseline": f"largest shard {shard:.0f} MB",
                        "ratio": m["growth_mb"] / shard,
                        "goal": None,
                    }
                )
        rows.extend(_merge_time(t, artifacts["MiniLM"]))
    return rows


def _merge_time(t: Path, art: Path) -> list[dict[str, Any]]:
    """merge of decomposed MiniLM vs a plain safetensors load+save of the artifact's tensors,
    with its parts: merge without input hashing, the contractions alone, and the merge of a
    truncated artifact (bond dims cut to half the parameters)."""
    import safetensors.torch as st

    import mposurgeon
    from mposurgeon.artifact.manifest import read_manifest
    from mposurgeon.artifact.store import sha256_file
    from mposurgeon.artifact.tensors import open_tensors
    from mposurgeon.stages.merge import dense_weight

    small = t / "MiniLM-half"
    mposurgeon.truncate(art, output=small, param_ratio=0.5)
    records = read_manifest(art).modules

    def copy() -> None:
        st.save_file(st.load_file(art / "model.safetensors"), t / "c.safetensors")

    def contractions() -> None:
        with open_tensors(art) as reader:
            for rec in records.values():
                dense_weight(rec, reader)

    def checksums() -> None:  # what the artifact format asks of every merge: hash in and out
        sha256_file(art / "model.safetensors")
        sha256_file(t / "m" / "model.safetensors")

    base = best_time(copy)
    runs = [
        ("merge of MiniLM (36 MPO modules), in-process", 1.5, lambda: _merge(art, t, True)),
        ("merge of MiniLM, input checksums not verified", None, lambda: _merge(art, t)),
        ("merge of MiniLM, its 36 contractions alone (no I/O)", None, contractions),
        ("merge of MiniLM, its sha256 of input and output alone", None, checksums),
        ("merge of MiniLM truncated to 0.5x MPO params", None, lambda: _merge(small, t, True)),
    ]
    rows = []
    for label, goal, fn in runs:
        secs = best_time(fn)
        rows.append(
            {
                "benchmark": label,
                "threads": torch.get_num_threads(),
                "value": f"{secs:.3f} s",
                "baseline": f"safetensors load_file + save_file {base:.3f} s",
                "ratio": secs / base,
                "goal": goal,
            }
        )
    rows.append(_contraction_rate(art, records, contractions))
    return rows


def _contraction_rate(art: Path, records: dict, contractions: Callable[[], None]) -> dict:
    """How close the contractions run to this CPU's matrix-multiply rate (GFLOP/s)."""
    from mposurgeon.artifact.tensors import open_tensors
    from mposurgeon.mpo.contract import reconstruct_flops

    with open_tensors(art) as reader:
        macs = sum(
            reconstruct_flops([reader.get(f"{name}.mpo.core.{k}") for k in range(len(r.bonds) - 1)])
            for name, r in records.items()
        )
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / best_time(lambda: a @ b, repeats=5) / 1e9
    rate = 2 * macs / best_time(contractions) / 1e9
    return {
        "benchmark": f"merge of MiniLM, contraction rate ({macs / 1e9:.2f} G multiply-adds)",
        "threads": torch.get_num_threads(),
        "value": f"{rate:.0f} GFLOP/s",
        "baseline": f"a 2048x2048 float32 matmul {gemm:.0f} GFLOP/s",
        "ratio": rate / gemm,
        "goal": None,
    }


def _merge(art: Path, t: Path, verify: bool = False) -> None:
    import mposurgeon

    mposurgeon.merge(art, output=t / "m", overwrite=True, verify_checksums=verify)
