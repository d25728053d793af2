"""load_model: an artifact as a live Hugging Face model with MPO layers in place.

Everything that is not MPO is loaded by `transformers` itself (`from_pretrained` on the
artifact directory, which holds a normal config and safetensors files); the factorized modules
are then swapped for `MPOLinear` / `MPOEmbedding` layers built from the stored cores.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig

from mposurgeon.artifact.manifest import Manifest, ModuleRecord, load_artifact
from mposurgeon.artifact.tensors import TensorReader, open_tensors
from mposurgeon.errors import UsageError
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.surgery import MPOModuleState, install_mpo_layers, resolve_module_name
from mposurgeon.mpo.shapes import MPOShape
from mposurgeon.stages.common import read_cores

#: task name -> transformers auto class (None: the class named in config.architectures).
TASKS: dict[str, str | None] = {
    "auto": None,
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


def model_class(config: Any, task: str = "auto") -> Any:
    """The transformers class for `task`, or the checkpoint's own architecture for "auto"."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}", hint=f"choose one of: {', '.join(TASKS)}")
    name = TASKS[task]
    if name is None:
        archs = getattr(config, "architectures", None) or []
        name = archs[0] if archs and hasattr(transformers, archs[0]) else "AutoModel"
    return getattr(transformers, name)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (MPO keys are expected to be
    'unexpected', and stderr belongs to mposurgeon's own progress and errors)."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def module_states(manifest: Manifest, reader: TensorReader) -> list[MPOModuleState]:
    """The cores of every MPO module of an artifact, read from its tensors."""
    return [_module_state(rec, reader) for rec in manifest.modules.values()]


def _module_state(rec: ModuleRecord, reader: TensorReader) -> MPOModuleState:
    shape = MPOShape(rec.out_dim, rec.in_dim, tuple(rec.out_modes), tuple(rec.in_modes))
    cores = read_cores(rec, reader)
    tied = tuple(re.sub(r"\.weight$", "", key) for key in rec.tied_keys)
    return MPOModuleState(name=rec.name, kind=rec.kind, shape=shape, cores=cores, tied_names=tied)


def load_model(
    artifact: str | Path,
    task: str = "auto",
    *,
    forward_mode: ForwardMode = "auto",
    verify: bool = True,
    config: Any | None = None,
) -> nn.Module:
    """The artifact's model with MPO layers in place, in eval mode.

    `task` picks the head ("auto": the base checkpoint's own class). `forward_mode` fixes how
    MPO layers evaluate ("reconstruct" the dense weight or "contract" the input; "auto" picks
    the cheaper per call). `config` overrides the stored config (e.g. labels of a new head).
    """
    path = Path(artifact)
    manifest = load_artifact(path, verify=verify)
    config = config or AutoConfig.from_pretrained(path)
    with quiet_transformers():
        model = model_class(config, task).from_pretrained(
            path, config=config, ignore_mismatched_sizes=True
        )
    with open_tensors(path) as reader:
        states = [_within(model, state) for state in module_states(manifest, reader)]
    install_mpo_layers(model, [s for s in states if s is not None], forward_mode)
    return model.eval()


def _within(model: nn.Module, state: MPOModuleState) -> MPOModuleState | None:
    """`state` restricted to the modules `model` has: a head of another task drops what the
    checkpoint's own head held (a classifier has no LM head tied to the embeddings); None if
    the model lacks the module itself."""

    def has(name: str) -> bool:
        try:
            resolve_module_name(model, name)
        except KeyError:
            return False
        return True

    if not has(state.name):
        return None
    return dataclasses.replace(state, tied_names=tuple(n for n in state.tied_names if has(n)))
