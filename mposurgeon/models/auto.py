"""Which `transformers` class loads a checkpoint for a task, and loading it quietly."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import transformers

from mposurgeon.errors import UsageError

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
