"""Which `transformers` class loads a checkpoint for a task, and loading it quietly."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
    import transformers  # here, not at import: it takes most of a second

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}", hint=f"choose one of: {', '.join(TASKS)}")
    name = TASKS[task]
    if name is None:
        archs = getattr(config, "architectures", None) or []
        name = archs[0] if archs and hasattr(transformers, archs[0]) else "AutoModel"
    return getattr(transformers, name)


#: The heads a model is trained with, by task: (head, the Auto class's model-type mapping).
_HEAD_MAPPINGS = {
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "base": "MODEL_MAPPING_NAMES",
}


def head_class_name(config: Any, head: str) -> str:
    """The name of the `transformers` class of `config`'s model type with `head` (a key of
    `_HEAD_MAPPINGS`: "base" is the model without a head); a KeyError if it has none."""
    return _mapping(head)[config.model_type]


def model_head(model: Any) -> str | None:
    """The head of a live model, as `trained_head` reads it from a config (by its class)."""
    name = type(model).__name__
    heads = ("sequence-classification", "causal-lm", "seq2seq-lm")
    return next((h for h in heads if name in _mapping(h).values()), None)


def _mapping(head: str) -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    return dict(getattr(modeling_auto, _HEAD_MAPPINGS[head]))


def has_head(config: Any, head: str) -> bool:
    """Whether `transformers` has a `head` model (a key of `_HEAD_MAPPINGS`) for `config`'s
    model type. causal-lm means a decoder-only model: an encoder (BERT's `BertLMHeadModel`)
    or an encoder-decoder (BART's decoder alone) is not one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _mapping(head):
        return False
    if head == "causal-lm":
        masked = _masked_lm_types()
        return not getattr(config, "is_encoder_decoder", False) and model_type not in masked
    return True


def _masked_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def trained_head(config: Any) -> str | None:
    """The head of the class `config.architectures` names: "sequence-classification",
    "causal-lm" or "seq2seq-lm"; None for a base model or another head (BertModel,
    BertForMaskedLM)."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        return None
    if archs[0].endswith("ForSequenceClassification"):
        return "sequence-classification"
    model_type = getattr(config, "model_type", None)
    for head in ("causal-lm", "seq2seq-lm"):
        if _mapping(head).get(model_type) == archs[0] and has_head(config, head):
            return head
    return None


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
