"""A model with a task head and its tokenizer for `train`, `eval` and `select --method fisher`.

For training (`training_model`), a classification or regression head is added when the
checkpoint has none (seeded, so runs are reproducible) with the labels of the data; causal-lm
and seq2seq train the model's own LM head. For evaluation (`trained_model`), the checkpoint's
own trained head is used as it is (`trained_task` tells which), with the labels of its config.
Decoder-only models (GPT-2, Llama, BLOOM) get a pad token: their EOS token, recorded in the
config as `pad_token_id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.load import load_model
from mposurgeon.artifact.store import VOCABULARY_FILES
from mposurgeon.errors import ArtifactError, UsageError, one_line
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.training.data import TextDataset
from mposurgeon.training.tasks import Task, check_model_task, get_task, head_task


@dataclass
class ModelSetup:
    """The model, its tokenizer, and the pad token set for it (None if it had one)."""

    model: nn.Module
    tokenizer: Any
    pad_token_set: str | None


def load_tokenizer(path: Path, *, is_artifact: bool = False) -> Any:
    """The checkpoint's tokenizer; a clear error when it ships none.

    A directory without vocabulary files is refused before transformers sees it: for many
    model types (BERT, GPT-2, T5) it would build an empty vocabulary and map every word to the
    unknown token, and a model trained on that learns nothing of the text.
    """
    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in VOCABULARY_FILES):
        if is_artifact:
            hint = (
                "the artifact was made from a checkpoint without tokenizer files: copy the "
                "base model's tokenizer files into that checkpoint and decompose it again"
            )
        else:
            hint = (
                f"copy the tokenizer files of the base model ({', '.join(VOCABULARY_FILES[:3])}"
                f", tokenizer_config.json, ...) into {path}"
            )
        raise UsageError(
            f"{path} has no tokenizer files (none of {', '.join(VOCABULARY_FILES)})", hint=hint
        )
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(
            f"{path} has no usable tokenizer ({str(exc).splitlines()[0][:120]})",
            hint="training and fisher scoring need tokenizer files next to the weights",
        ) from None


def ensure_pad_token(tokenizer: Any, config: Any) -> str | None:
    """Give a tokenizer without pad token its EOS (or UNK) token as pad; record it in config."""
    if tokenizer.pad_token is None:
        token = tokenizer.eos_token or tokenizer.unk_token
        if token is None:
            raise UsageError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = token
        config.pad_token_id = tokenizer.pad_token_id
        return token
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return None


def training_model(
    path: Path,
    *,
    is_artifact: bool,
    task: Task,
    data: TextDataset,
    seed: int = 0,
    verify: bool = True,
) -> ModelSetup:
    """`path`'s model with the head of `task` (MPO layers in place for an artifact): a new
    head for the labels of `data` (classification, regression), initialized under `seed`, or
    the model's own LM head (causal-lm, seq2seq)."""
    config = read_config(path)
    check_model_task(config, task, path)
    tokenizer = load_tokenizer(path, is_artifact=is_artifact)
    pad = ensure_pad_token(tokenizer, config)
    task.configure(config, data)
    torch.manual_seed(seed)
    if is_artifact:
        model = load_model(path, task.head, config=config, verify=verify)
    else:
        with quiet_transformers():
            model = model_class(config, task.head).from_pretrained(
                path, config=config, ignore_mismatched_sizes=True
            )
    return ModelSetup(model=model, tokenizer=tokenizer, pad_token_set=pad)


def classification_model(
    path: Path, *, is_artifact: bool, data: TextDataset, seed: int = 0, verify: bool = True
) -> ModelSetup:
    """`training_model` with a sequence-classification head for the labels of `data`."""
    return training_model(
        path,
        is_artifact=is_artifact,
        task=get_task("classification"),
        data=data,
        seed=seed,
        verify=verify,
    )


def trained_task(path: Path, config: Any, task: str | None = None) -> Task:
    """The task of the trained head of the model at `path` (its config: `config`): what
    `eval` scores. `task` (`--task`) must agree with it. A model without a trained head (a
    base checkpoint such as MiniLM, a masked LM) is a usage error."""
    found = head_task(config)
    if found is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architecture"
        raise UsageError(
            f"{path} has no trained task head ({archs}): eval scores a sequence classifier or "
            "regressor, a causal LM or a seq2seq LM",
            hint="train it first: mposurgeon train MODEL --method full --data TRAIN.jsonl "
            "adds a head for the labels of the data",
        )
    outputs = getattr(config, "num_labels", 1)
    if found == "regression" and outputs != 1:
        raise UsageError(
            f"{path} has a regression head with {outputs} outputs: eval scores one real value "
            "per row"
        )
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise UsageError(
            f"{path} has a multi-label classification head: eval scores single-label classification"
        )
    if task is not None and task != found:
        raise UsageError(
            f"{path} has a {found} head: --task {task} does not apply",
            hint=f"leave --task out (or pass --task {found})",
        )
    return get_task(found)


def classifier_labels(path: Path, config: Any) -> list[str]:
    """The label names of the classifier whose config (of `path`) is `config`, in id order
    (`label2id` decides the ids)."""
    ids = {name: int(i) for name, i in config.label2id.items()}
    if sorted(ids.values()) != list(range(config.num_labels)):
        raise ArtifactError(
            f"{path}/config.json: label2id {config.label2id} does not number "
            f"{config.num_labels} labels 0..{config.num_labels - 1}"
        )
    return sorted(ids, key=ids.__getitem__)


def trained_model(
    path: Path, config: Any, task: Task, *, is_artifact: bool, verify: bool = True
) -> ModelSetup:
    """`path`'s model as it is, with its own `task` head, in eval mode, and its tokenizer with
    a pad token (as `training_model` gives them to `train`). An artifact's modules stay
    factorized (`load_model`); a dense checkpoint must hold every weight of the model."""
    tokenizer = load_tokenizer(path, is_artifact=is_artifact)
    pad = ensure_pad_token(tokenizer, config)
    if is_artifact:
        model = load_model(path, task.head, config=config, verify=verify)
    else:
        try:
            with quiet_transformers():
                model, info = model_class(config, task.head).from_pretrained(
                    path, config=config, output_loading_info=True
                )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"cannot load the model in {path}: {one_line(exc)}") from None
        if info["missing_keys"]:
            keys = sorted(info["missing_keys"])
            missing = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ArtifactError(
                f"{path} lacks weights of its model ({missing}): they would be random",
                hint="evaluate the checkpoint that training wrote, or train one first",
            )
    return ModelSetup(model=model.eval(), tokenizer=tokenizer, pad_token_set=pad)


def enable_gradient_checkpointing(model: nn.Module, path: Path) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them
    (torch's non-reentrant checkpointing: frozen inputs need no gradient, dropout draws the
    same numbers again)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"--gradient-checkpointing: transformers has no gradient checkpointing for "
            f"{type(model).__name__} ({path})",
            hint="leave --gradient-checkpointing out",
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
