"""Peak memory of each stage at default options, against one input shard; merge time.

Each stage runs in a fresh child process, at default options (`max_shard_size` `auto`). The
child imports what every stage imports and builds the model's layout (the modeling import is
not streaming memory), resets its resident high-water mark (/proc/self/clear_refs), then waits
for the parent, which takes the baseline and samples /proc/<child>/status every few
milliseconds while the stage runs (its counters cost microseconds to read; sampling
smaps_rollup, which walks the child's page tables under its memory-map lock, made an 8-layer
decompose take 54 s instead of 30 s). Reported, as growth over that baseline:

- resident peak: `VmHWM` of /proc/<child>/status, read by the child at the end: every page
  the stage touched, the memory-mapped input shard's included (the kernel may drop those);
- private peak: the sampled peak of `RssAnon` (the same count as smaps_rollup's
  `Anonymous`): the stage's own allocations (and copied-on-write pages), which nothing but
  freeing gives back. smaps' `Private_Clean` and `Private_Dirty` are not used: they count the
  page-cache pages of an input file that only this process maps, and such pages are dirty
  until written back (a checkpoint written seconds before is read through dirty pages), so
  they would charge the input's pages to the stage.

The bound is the stage input's largest shard file plus 3x the largest decomposed matrix in
float32 (issue 17's: a stage may hold a shard and works on a few matrices at a time; the
writer writes each tensor as it comes, so in fact no shard is held). It must hold, and the
peaks be the same, for a checkpoint of 2 and of 6 layers with the same shard size:
Llama-shaped (hidden 2048, intermediate 5632, vocab 32000, 32 heads, 4 key-value heads:
TinyLlama-1.1B's shapes),
random bfloat16 weights, saved by transformers' `save_pretrained(max_shard_size=...)` in a
temporary directory. `python -m benchmarks.bench_memory --layers 2 6 --shard 300MB` runs only
this table (`--cap-gb` kills a stage that grows past that resident size: reported, not run on).

The shipped MiniLM (one 90 MB file) is measured too, and merge time against plain copies.
`copy` is a plain safetensors load and save of each shard; `contract` contracts every module
of an artifact and writes nothing (merge's arithmetic alone). The child asks torch for huge
pages before importing it, as the console script does (`mposurgeon/memory.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import best_time, minilm_dir

#: The stages measured, each with the input it reads: the checkpoint ("src") or its
#: decomposition at defaults ("dec"). Keyword arguments beyond defaults: what the stage needs.
STAGES: list[tuple[str, str, dict[str, Any]]] = [
    ("decompose", "src", {}),
    ("copy", "src", {}),
    ("truncate", "dec", {"param_ratio": 0.5}),
    ("merge", "dec", {}),
    ("select", "src", {"method": "magnitude", "top_n": 1}),
    ("select", "src", {"method": "entropy", "top_n": 1}),
    ("inspect", "dec", {}),
]

CHILD = r"""
import json, sys
from pathlib import Path
stage, src, out, kwargs = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
from mposurgeon.memory import use_huge_pages_for_tensors
use_huge_pages_for_tensors()  # before torch is imported, as the console script does
import torch, transformers, safetensors.torch  # the same imports in every stage
import mposurgeon
import mposurgeon.stages.decompose, mposurgeon.stages.truncate, mposurgeon.stages.merge
import mposurgeon.stages.select, mposurgeon.stages.inspect
from mposurgeon.artifact.tensors import open_tensors, tensor_files
from mposurgeon.stages.common import model_layout
model_layout(src)  # the modeling import and the layout: not streaming memory
if kwargs.get("device") == "cuda":  # the CUDA context: not streaming memory either
    torch.zeros(1, device="cuda")
try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
except OSError:
    pass
print("ready", flush=True)
sys.stdin.readline()  # the parent has its baseline
if stage == "copy":  # a plain safetensors load and save of each shard: the floor
    out.mkdir(parents=True)
    for file in tensor_files(src):
        safetensors.torch.save_file(
            safetensors.torch.load_file(file), out / file.name, metadata={"format": "pt"}
        )
elif stage == "contract":  # merge's arithmetic alone: every module contracted, nothing written
    from mposurgeon.artifact.manifest import read_manifest
    from mposurgeon.methods.registry import get_method
    with open_tensors(src) as reader:
        for rec in read_manifest(src).modules.values():
            get_method(rec.method).to_dense(rec, reader)
elif stage == "inspect":
    mposurgeon.inspect(src)
else:
    getattr(mposurgeon, stage)(src, output=out, **kwargs)
status = dict(
    line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
)
peaks = {"vmhwm_kb": int(status["VmHWM"].split()[0])}
if torch.cuda.is_initialized():
    peaks["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
print(json.dumps(peaks), flush=True)
"""


def _kb(path: Path, fields: Sequence[str]) -> dict[str, int]:
    """The `fields` (kB) of a /proc status file; {} once the process is gone."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            found[name] = int(rest.split()[0])
    return found


def measure(
    stage: str, src: Path, out: Path, kwargs: dict[str, Any], cap_mb: float | None = None
) -> dict[str, Any]:
    """Run one stage in a child process; its resident and private peak growth (MB) and time
    (s), and `cuda_peak_mb` (torch's allocated peak) when the stage used the GPU.

    With `cap_mb`, the child is killed once its resident set passes that size (`capped`).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, stage, str(src), str(out), json.dumps(kwargs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors: list[str] = []
    drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    drain.start()
    if proc.stdout.readline().strip() != "ready":
        proc.wait()
        drain.join()
        raise RuntimeError(f"{stage} child failed: {errors[0][-2000:]}")
    status = Path(f"/proc/{proc.pid}/status")
    base = _kb(status, ["VmRSS", "RssAnon"])
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.read()), daemon=True)
    start = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    reader.start()
    private_peak, capped = base["RssAnon"], False
    while proc.poll() is None:
        now = _kb(status, ["RssAnon", "VmRSS"])
        private_peak = max(private_peak, now.get("RssAnon", 0))
        if cap_mb is not None and now.get("VmRSS", 0) / 1024 > cap_mb:
            proc.kill()  # our own child, past the memory this run may take
            capped = True
        time.sleep(0.003)
    seconds = time.perf_counter() - start
    reader.join()
    drain.join()
    if capped:
        return {"capped": True, "seconds": seconds, "private_mb": private_peak / 1024}
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} child failed: {errors[0][-2000:]}")
    peaks = json.loads(result[0].strip().splitlines()[-1])
    return {
        "capped": False,
        "seconds": seconds,
        "resident_mb": (peaks["vmhwm_kb"] - base["VmRSS"]) / 1024,
        "private_mb": (private_peak - base["RssAnon"]) / 1024,
    } | ({"cuda_peak_mb": peaks["cuda_peak_mb"]} if "cuda_peak_mb" in peaks else {})


def llama_checkpoint(directory: Path, layers: int, shard: str) -> Path:
    """A Llama-shaped checkpoint (TinyLlama-1.1B's shapes, `layers` layers) of random bfloat16
    weights, saved by transformers in shards of at most `shard` (e.g. "300MB"); built in a
    child process so that its memory is given back."""
    script = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, layers, shard = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out, max_shard_size=shard)
"""
    subprocess.run(
        [sys.executable, "-c", script, str(directory), str(layers), shard],
        check=True,
        capture_output=True,
    )
    return directory


def largest_shard_mb(path: Path) -> float:
    """The largest tensor file of checkpoint or artifact `path`, in MB."""
    from mposurgeon.artifact.tensors import tensor_files

    return max(f.stat().st_size for f in tensor_files(path)) / 1e6


def largest_matrix_f32_mb(artifact: Path) -> float:
    """The largest matrix a stage factorizes or contracts (the manifest's modules), in
    float32."""
    from mposurgeon.artifact.manifest import read_manifest

    modules = read_manifest(artifact).modules.values()
    return max(rec.shape[0] * rec.shape[1] for rec in modules) * 4 / 1e6


def stage_peaks(
    src: Path,
    work: Path,
    label: str,
    cap_mb: float | None = None,
    stages: Collection[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The stages of `STAGES` (those named in `stages`; decompose always runs, the others read
    its output) on checkpoint `src` at default options: one row each."""
    dec = work / f"{src.name}-dec"
    matrix = None
    for stage, reads, kwargs in STAGES:
        if stages is not None and stage not in stages and stage != "decompose":
            continue
        inp = src if reads == "src" else dec
        if reads == "dec" and not (dec / "mposurgeon.json").is_file():
            continue  # decompose was killed (cap_mb): nothing to read
        out = work / f"{src.name}-{stage}-{kwargs.get('method', '')}"
        if stage == "decompose":
            out = dec
        m = measure(stage, inp, out, kwargs, cap_mb)
        if matrix is None and dec.exists():
            matrix = largest_matrix_f32_mb(dec)
        name = stage + (f" --method {kwargs['method']}" if "method" in kwargs else "")
        # copy handles no matrices: its bound is the shard alone
        yield peak_row(
            name,
            m,
            largest_shard_mb(inp),
            None if stage == "copy" else matrix or 0.0,
            label,
            cap_mb,
        )


def peak_row(
    name: str,
    m: dict[str, Any],
    shard_mb: float,
    matrix_mb: float | None,
    label: str,
    cap_mb: float | None = None,
) -> dict[str, Any]:
    """The row of stage `name` measured as `m` (`measure`'s result) against the bound: the
    largest input shard `shard_mb` plus 3x the largest matrix in float32 `matrix_mb` (goal:
    within it; no goal without a matrix, as for a copy)."""
    bound = shard_mb + 3 * (matrix_mb or 0.0)
    if m["capped"]:
        value = f"killed past {cap_mb:.0f} MB resident after {m['seconds']:.0f} s"
        ratio = None
    else:
        value = (
            f"private {m['private_mb']:.0f} MB, resident {m['resident_mb']:.0f} MB, "
            f"{m['seconds']:.1f} s"
        )
        if "cuda_peak_mb" in m:
            value += f", GPU {m['cuda_peak_mb']:.0f} MB"
        ratio = m["private_mb"] / bound
    return {
        "benchmark": f"peak memory of {name} at defaults, {label}",
        "stage": name,
        "threads": torch.get_num_threads(),
        "value": value,
        "baseline": f"largest input shard {shard_mb:.0f} MB"
        + (
            f" + 3 x {matrix_mb:.0f} MB (largest matrix in float32) = {bound:.0f} MB"
            if bound > shard_mb
            else ""
        ),
        "ratio": ratio,
        "goal": 1.0 if matrix_mb is not None else None,
        "private_mb": None if m["capped"] else round(m["private_mb"], 1),
        "resident_mb": None if m["capped"] else round(m["resident_mb"], 1),
        "seconds": round(m["seconds"], 2),
    }


def total_mb(path: Path) -> float:
    """The tensor files of checkpoint or artifact `path` together, in MB."""
    from mposurgeon.artifact.tensors import tensor_files

    return sum(f.stat().st_size for f in tensor_files(path)) / 1e6


def llama_rows(
    layers: Sequence[int] = (2, 6),
    shard: str = "300MB",
    cap_mb: float | None = None,
    stages: Collection[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """`stage_peaks` for Llama-shaped checkpoints of each number of `layers`, `shard` shards,
    then per stage the private peak of the most layers against the fewest (goal: the same)."""
    peaks: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for n in layers:
            src = llama_checkpoint(t / f"llama-{n}", n, shard)
            label = (
                f"Llama-shaped, {n} layers ({total_mb(src):.0f} MB bf16 in "
                f"{len(list(src.glob('*.safetensors')))} shards of <= {shard})"
            )
            for row in stage_peaks(src, t, label, cap_mb, stages):
                if row["private_mb"] is not None:
                    peaks.setdefault(row["stage"], {})[n] = row["private_mb"]
                yield row
            for path in t.iterdir():  # keep the disk use to one checkpoint's
                remove(path)
    for stage, by_layers in peaks.items():
        few, many = min(by_layers), max(by_layers)
        if few != many:
            yield {
                "benchmark": f"private peak of {stage} at defaults, {many} vs {few} layers",
                "stage": stage,
                "threads": torch.get_num_threads(),
                "value": f"{by_layers[many]:.0f} MB",
                "baseline": f"{by_layers[few]:.0f} MB",
                "ratio": by_layers[many] / max(by_layers[few], 1.0),
                "goal": 1.1,
            }


def remove(path: Path) -> None:
    """Delete directory `path` and what it holds (nothing if it is gone)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


#: Resident size past which `run` kills a stage (reported, not run on): this suite shares its
#: machine, and a stage that holds the whole model would show past it anyway.
RUN_CAP_MB = 4096


def run() -> list[dict[str, Any]]:
    rows = list(llama_rows(cap_mb=RUN_CAP_MB))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        dec = t / "MiniLM-dec"
        for stage, inp, out in (
            ("copy", minilm_dir(), t / "MiniLM-copy"),
            ("decompose", minilm_dir(), dec),
            ("merge", dec, t / "MiniLM-merged"),
        ):
            m = measure(stage, inp, out, {})
            rows.append(
                {
                    "benchmark": f"peak memory of {stage} at defaults, MiniLM (one file)",
                    "threads": torch.get_num_threads(),
                    "value": f"private {m['private_mb']:.0f} MB, "
                    f"resident {m['resident_mb']:.0f} MB",
                    "baseline": f"the file {largest_shard_mb(inp):.0f} MB",
                    "ratio": m["private_mb"] / largest_shard_mb(inp),
                    "goal": None,
                }
            )
        rows.extend(_merge_time(t, dec))
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


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m benchmarks.bench_memory`: only the Llama-shaped table, as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--shard", default="300MB", help="the checkpoint's max_shard_size")
    parser.add_argument("--cap-gb", type=float, default=None, help="kill a stage past this RSS")
    parser.add_argument("--stages", nargs="+", default=None, help="only these (and decompose)")
    args = parser.parse_args(argv)
    cap = args.cap_gb * 1024 if args.cap_gb is not None else None
    for row in llama_rows(args.layers, args.shard, cap, args.stages):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
