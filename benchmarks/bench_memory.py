"""Peak memory (max RSS) of decompose and merge, each in a fresh process, against a fresh
process that does a plain safetensors load-and-save of the same checkpoint (the floor: the
largest shard in memory once). Also merge time against that plain copy, in-process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import best_time, minilm_dir

CHILD = r"""
import json, resource, sys
from pathlib import Path
mode, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import torch, transformers, safetensors.torch as st  # same imports in every mode
import mposurgeon
if mode == "copy":
    st.save_file(st.load_file(src / "model.safetensors"), out, metadata={"format": "pt"})
elif mode == "decompose":
    mposurgeon.decompose(src, output=out, layers=["FFN_1", "FFN_2", "attention"])
elif mode == "merge":
    mposurgeon.merge(src, output=out)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _peak_mb(mode: str, src: Path, out: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mb"]


def run() -> list[dict[str, Any]]:
    import safetensors.torch as st

    import mposurgeon

    src = minilm_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        floor = _peak_mb("copy", src, t / "copy.safetensors")
        dec = _peak_mb("decompose", src, t / "dec")
        merged = _peak_mb("merge", t / "dec", t / "merged")
        for what, mb in (("decompose", dec), ("merge", merged)):
            rows.append(
                {
                    "benchmark": f"peak RSS of {what} (MiniLM, 90 MB shard)",
                    "threads": None,
                    "seconds": None,
                    "value_mb": mb,
                    "baseline": "plain safetensors load+save process",
                    "baseline_mb": floor,
                    "ratio": mb / floor,
                    "goal": None,
                }
            )

        def copy() -> None:
            st.save_file(st.load_file(t / "dec" / "model.safetensors"), t / "c.safetensors")

        def merge() -> None:
            mposurgeon.merge(t / "dec", output=t / "m", overwrite=True)

        base, secs = best_time(copy), best_time(merge)
        rows.append(
            {
                "benchmark": "merge (36 MPO modules) vs plain load+save of the artifact's tensors",
                "threads": None,
                "seconds": secs,
                "baseline": "safetensors load_file + save_file",
                "baseline_seconds": base,
                "ratio": secs / base,
                "goal": 1.5,
            }
        )
    return rows
