"""`train` unchanged under torchrun: 2 CPU processes (DDP, gloo), only the main one writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


def test_two_cpu_processes_train_an_mpo_model(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = tmp_path / "dec"
    mposurgeon.decompose(tiny_classifier_dir("bert"), output=source, layers=["FFN_1", "FFN_2"])
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mposurgeon",
        "train",
        str(source),
        "-o",
        str(out),
        "--mode",
        "overparam",
        "--data",
        str(TRAIN),
        "--eval-data",
        str(EVAL),
        "--epochs",
        "6",
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0.1",  # the tiny random model then leaves its loss plateau for every seed tried
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON object: only the main process prints
    metrics = report["metrics"]
    assert report["output"] == str(out)
    assert metrics["num_processes"] == 2
    assert metrics["steps"] == 60  # 320 rows / (16 per batch * 2 processes) * 6 epochs
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert read_manifest(out).metrics == metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec", "out"]  # nothing else left

    model = mposurgeon.load_model(out)  # the result loads, MPO layers in place
    assert sum(".mpo.core." in name for name, _ in model.named_parameters()) == 4 * 5
    assert isinstance(next(model.parameters()), torch.nn.Parameter)
