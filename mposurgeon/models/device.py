"""The compute device a stage runs on: `--device` (decompose, truncate, merge; train and eval
through accelerate).

Each matrix is moved to the device for its SVD or contraction and its results back to the
CPU before they are written, one module at a time, so the device holds a few matrices, never
the model. On a machine without CUDA, `auto` is the CPU and nothing changes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mposurgeon.errors import UsageError

#: `--device`: auto (a GPU when torch sees one), cpu or cuda.
Device = Literal["auto", "cpu", "cuda"]


def compute_device(option: Device) -> torch.device:
    """The device `--device option` means here: auto is the first GPU when torch sees one,
    else the CPU; cuda without a GPU is a usage error."""
    cuda = torch.cuda.is_available()
    if option == "cuda" and not cuda:
        raise UsageError(
            "--device cuda: torch sees no CUDA device here",
            hint="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine",
        )
    return torch.device("cuda" if option != "cpu" and cuda else "cpu")


def on_cpu(tensors: list[Tensor]) -> list[Tensor]:
    """`tensors` brought back to the CPU (the same tensors if they are there)."""
    return [t.to("cpu") for t in tensors]
