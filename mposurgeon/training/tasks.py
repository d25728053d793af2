"""Tasks: what `train` fits a model for, and what `train` and `eval` score.

- classification: a *ForSequenceClassification head with K labels; data: text (and pair) and
  a class label; metrics: accuracy, macro_f1, mcc, loss (cross-entropy per row, nats).
- regression: a *ForSequenceClassification head with one output (problem_type regression);
  data: text (and pair) and a real label; metrics: pearson, spearman, loss (squared error
  per row).
- causal-lm: a *ForCausalLM head (GPT-2, Llama, BLOOM); data: text, or prompt + completion;
  metrics: loss (nats per predicted token), perplexity, tokens.
- seq2seq: a *ForConditionalGeneration head (T5, BART); data: source + target; metrics as
  causal-lm.

Encoding. Classification and regression tokenize the text (and pair), cut to `max_length`.
causal-lm: a plain `text` row is trained on every token; a prompt + completion row only on the
completion's tokens (the prompt's labels are -100). The prompt is tokenized with the
tokenizer's special tokens (Llama's BOS), the completion without, and the EOS token ends
every row, so a fine-tuned model learns where to stop; the row is then cut to `max_length`
from the right (a row whose completion is cut away entirely is an error naming it). The
completion is appended token for token: a completion that follows the prompt after a space
holds that space (" Paris"), as in TRL. seq2seq: the source and the target (`text_target`)
are each cut to `max_length`.

Padding is on the right (causal models count positions from the first token), labels are
padded with -100, and a seq2seq batch gets its `decoder_input_ids` from the model
(`prepare_decoder_input_ids_from_labels`: the labels shifted right).

Scoring (`evaluate`) runs the model without labels and computes every figure from the logits
in float32 (float64 sums): a row's loss for the sequence tasks, the mean loss per predicted
token over all rows for the token tasks (not a mean of batch means), so it does not depend on
the batch size or the number of processes. `exact_match` (`--generate`) is scored in
`training/generation.py`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mposurgeon.errors import DataError, UsageError
from mposurgeon.models.auto import has_head, trained_head
from mposurgeon.models.layers import reuse_dense_weights
from mposurgeon.progress import ProgressCallback
from mposurgeon.training.data import TASKS, TextDataset
from mposurgeon.training.metrics import (
    classification_metrics,
    exp_loss,
    pearson,
    spearman,
)

#: Label id that losses ignore (padding, prompt tokens).
IGNORE = -100

Rows = list[dict[str, Any]]


def model_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of `batch` that `model.forward` accepts (e.g. no token_type_ids for GPT-2)."""
    accepted = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(batch)
    return {k: v for k, v in batch.items() if k in accepted}


class Scorer:
    """Accumulates one evaluation: `add` each batch's logits and labels (every process's
    share gathered, each row once), then `result`."""

    def add(self, accelerator: Any, logits: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """One task: its head, how rows are encoded and batched, how they are scored."""

    name: ClassVar[str]
    #: The head `models.auto.model_class` loads for it.
    head: ClassVar[str]
    #: The figures `evaluate` reports (besides `rows`), the main one first.
    metrics: ClassVar[tuple[str, ...]]
    #: Those of `metrics` where higher is better (the others: lower is better).
    maximize: ClassVar[frozenset[str]] = frozenset()
    #: Whether `--generate` can score it (a text to produce).
    generates: ClassVar[bool] = False
    #: Whether rows carry class labels, numbered by the model's `label2id`.
    has_classes: ClassVar[bool] = False
    #: Whether the model continues its input (causal: logits at t predict the token at t + 1)
    #: rather than answering it (seq2seq).
    shift: ClassVar[bool] = False

    def check_training_data(self, data: TextDataset) -> None:
        """Refuse training data the task cannot learn from."""

    def configure(self, config: Any, data: TextDataset) -> None:
        """Set `config` up for a new head trained on `data` (labels, problem type)."""

    def encode(self, data: TextDataset, tokenizer: Any, max_length: int) -> Rows:
        """Tokenized rows, unpadded, with their `labels`."""
        raise NotImplementedError

    def collator(self, tokenizer: Any, model: nn.Module) -> Callable[[Rows], dict[str, Tensor]]:
        """Batches encoded rows: pads them, and adds what the model needs besides."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def scorer(self) -> Scorer:
        raise NotImplementedError


# -- classification and regression -------------------------------------------------------------


def _sequence_rows(
    data: TextDataset, tokenizer: Any, max_length: int, labels: Sequence[Any]
) -> Rows:
    texts = [ex.text for ex in data.examples]
    pairs = [ex.text_pair or "" for ex in data.examples]
    has_pairs = any(ex.text_pair is not None for ex in data.examples)
    enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
    check_vocabulary(data, tokenizer, enc["input_ids"])
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": label} for i, label in enumerate(labels)]


def check_vocabulary(data: TextDataset, tokenizer: Any, ids: Sequence[Sequence[int]]) -> None:
    """A tokenizer that turns every row into special tokens only (all unknown, or nothing)
    does not fit the data: a usage error."""
    special = set(tokenizer.all_special_ids)
    if not any(set(row) - special for row in ids):
        unk = f" ({tokenizer.unk_token})" if tokenizer.unk_token else ""
        raise UsageError(
            f"the tokenizer maps every word of {data.name} to its unknown token{unk} "
            "or to nothing: it does not fit this data",
            hint="train a checkpoint whose tokenizer covers the language of the data",
        )


class Classification(Task):
    name = "classification"
    head = "sequence-classification"
    metrics = ("accuracy", "macro_f1", "mcc", "loss")
    maximize = frozenset({"accuracy", "macro_f1", "mcc"})
    has_classes = True

    def check_training_data(self, data: TextDataset) -> None:
        if len(data.labels) < 2:
            raise UsageError(
                f"{data.name} holds a single label ({data.labels[0]!r}): nothing to classify",
                hint="the training data needs at least two labels",
            )

    def configure(self, config: Any, data: TextDataset) -> None:
        config.num_labels = len(data.labels)
        config.id2label = data.id2label
        config.label2id = data.label2id
        config.problem_type = "single_label_classification"

    def encode(self, data: TextDataset, tokenizer: Any, max_length: int) -> Rows:
        return _sequence_rows(data, tokenizer, max_length, data.label_ids())

    def scorer(self) -> Scorer:
        return _ClassificationScorer()


class _ClassificationScorer(Scorer):
    def __init__(self) -> None:
        self.preds: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.losses: list[Tensor] = []

    def add(self, accelerator: Any, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        p, y, lo = accelerator.gather_for_metrics((logits.argmax(-1), labels, loss))
        self.preds.append(p.cpu())
        self.labels.append(y.cpu())
        self.losses.append(lo.cpu())

    def result(self) -> dict[str, float]:
        if not self.losses:
            return {**classification_metrics([], []), "loss": math.nan, "rows": 0}
        labels = torch.cat(self.labels)
        return {
            **classification_metrics(torch.cat(self.preds), labels),
            "loss": float(torch.cat(self.losses).double().mean()),
            "rows": labels.numel(),
        }


class Regression(Task):
    name = "regression"
    head = "sequence-classification"
    metrics = ("pearson", "spearman", "loss")
    maximize = frozenset({"pearson", "spearman"})

    def check_training_data(self, data: TextDataset) -> None:
        values = set(data.label_values())
        if len(values) < 2:
            raise UsageError(
                f"{data.name}: every label is {values.pop()!r}: nothing to fit",
                hint="regression needs labels that differ",
            )

    def configure(self, config: Any, data: TextDataset) -> None:
        config.num_labels = 1
        config.id2label = {0: "score"}
        config.label2id = {"score": 0}
        config.problem_type = "regression"

    def encode(self, data: TextDataset, tokenizer: Any, max_length: int) -> Rows:
        return _sequence_rows(data, tokenizer, max_length, data.label_values())

    def scorer(self) -> Scorer:
        return _RegressionScorer()


class _RegressionScorer(Scorer):
    def __init__(self) -> None:
        self.preds: list[Tensor] = []
        self.labels: list[Tensor] = []

    def add(self, accelerator: Any, logits: Tensor, labels: Tensor) -> None:
        preds = logits.float().reshape(-1)
        p, y = accelerator.gather_for_metrics((preds, labels.float()))
        self.preds.append(p.cpu())
        self.labels.append(y.cpu())

    def result(self) -> dict[str, float]:
        if not self.preds:
            return {"pearson": math.nan, "spearman": math.nan, "loss": math.nan, "rows": 0}
        p, y = torch.cat(self.preds).double(), torch.cat(self.labels).double()
        return {
            "pearson": pearson(p, y),
            "spearman": spearman(p, y),
            "loss": float(((p - y) ** 2).mean()),
            "rows": y.numel(),
        }


# -- causal-lm and seq2seq ----------------------------------------------------------------------


@dataclass
class TokenCollator:
    """Pads rows of input_ids / attention_mask / labels on the right (labels with -100); for
    a seq2seq model adds `decoder_input_ids` (its labels shifted right)."""

    pad_id: int
    decoder_inputs: Callable[..., Tensor] | None = None

    def __call__(self, rows: Rows) -> dict[str, Tensor]:
        batch = {
            "input_ids": pad_ids([r["input_ids"] for r in rows], self.pad_id),
            "attention_mask": pad_ids([r["attention_mask"] for r in rows], 0),
            "labels": pad_ids([r["labels"] for r in rows], IGNORE),
        }
        if self.decoder_inputs is not None:
            batch["decoder_input_ids"] = self.decoder_inputs(labels=batch["labels"])
        return batch


def pad_ids(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> Tensor:
    """Rows of ids as one (rows, longest) int64 tensor, padded with `value`."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class _TokenTask(Task):
    metrics = ("loss", "perplexity", "tokens")
    maximize = frozenset({"exact_match"})  # with --generate
    generates = True

    def collator(self, tokenizer: Any, model: nn.Module) -> Callable[[Rows], dict[str, Tensor]]:
        decoder_inputs = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        return TokenCollator(tokenizer.pad_token_id, decoder_inputs if not self.shift else None)

    def scorer(self) -> Scorer:
        return _TokenScorer(self.shift)


class CausalLM(_TokenTask):
    name = "causal-lm"
    head = "causal-lm"
    shift = True

    def encode(self, data: TextDataset, tokenizer: Any, max_length: int) -> Rows:
        eos = tokenizer.eos_token_id
        inputs = tokenizer([ex.text for ex in data.examples])["input_ids"]
        check_vocabulary(data, tokenizer, inputs)
        targets: list[list[int] | None] = [None] * len(inputs)
        with_target = [i for i, ex in enumerate(data.examples) if ex.target is not None]
        if with_target:
            texts = [data.examples[i].target for i in with_target]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for i, ids in zip(with_target, encoded, strict=True):
                targets[i] = list(ids)
        rows = []
        for ex, prompt, target in zip(data.examples, inputs, targets, strict=True):
            where = f"{data.name} {data.unit} {ex.line}"
            if target is None:  # plain text: every token
                ids = _ended(list(prompt), eos)[:max_length]
                if len(ids) < 2:
                    raise DataError(
                        f"{where}: the text has fewer than 2 tokens: nothing to predict",
                        hint="drop empty rows from the data",
                    )
                labels = list(ids)
            else:
                completion = _ended(target, eos)
                ids = (list(prompt) + completion)[:max_length]
                labels = ([IGNORE] * len(prompt) + completion)[:max_length]
                if all(label == IGNORE for label in labels):
                    raise DataError(
                        f"{where}: the prompt fills --max-length {max_length} tokens: no room "
                        "for the completion",
                        hint="raise --max-length, or shorten the prompt",
                    )
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        return rows


def _ended(ids: list[int], eos: int | None) -> list[int]:
    """`ids` ending with the EOS token (added unless the tokenizer already ends rows with it)."""
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


class Seq2Seq(_TokenTask):
    name = "seq2seq"
    head = "seq2seq-lm"
    shift = False

    def encode(self, data: TextDataset, tokenizer: Any, max_length: int) -> Rows:
        sources = [ex.text for ex in data.examples]
        targets = [ex.target or "" for ex in data.examples]
        enc = tokenizer(sources, truncation=True, max_length=max_length)
        check_vocabulary(data, tokenizer, enc["input_ids"])
        labels = tokenizer(text_target=targets, truncation=True, max_length=max_length)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": labels["input_ids"][i],
            }
            for i in range(len(sources))
        ]


class _TokenScorer(Scorer):
    """Sums the cross-entropy (nats) of every predicted token and counts them, per row."""

    def __init__(self, shift: bool) -> None:
        self.shift = shift
        self.sums: list[Tensor] = []
        self.counts: list[Tensor] = []

    def add(self, accelerator: Any, logits: Tensor, labels: Tensor) -> None:
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )  # (rows, tokens)
        mask = labels != IGNORE
        sums = (losses.double() * mask).sum(1)
        s, c = accelerator.gather_for_metrics((sums, mask.sum(1)))
        self.sums.append(s.cpu())
        self.counts.append(c.cpu())

    def result(self) -> dict[str, float]:
        tokens = int(torch.cat(self.counts).sum()) if self.counts else 0
        rows = int(sum(c.numel() for c in self.counts))
        if tokens == 0:
            return {"loss": math.nan, "perplexity": math.nan, "tokens": 0, "rows": rows}
        loss = float(torch.cat(self.sums).sum()) / tokens
        return {"loss": loss, "perplexity": exp_loss(loss), "tokens": tokens, "rows": rows}


# -- the registry ---------------------------------------------------------------------------

_TASKS: dict[str, Task] = {
    t.name: t for t in (Classification(), Regression(), CausalLM(), Seq2Seq())
}
assert tuple(_TASKS) == TASKS


def get_task(name: str) -> Task:
    """The task called `name` (one of `data.TASKS`)."""
    if name not in _TASKS:
        raise UsageError(f"unknown task {name!r}", hint=f"choose one of {', '.join(_TASKS)}")
    return _TASKS[name]


def generative_task(config: Any) -> str | None:
    """The generative task a model of `config` trains for when its data has no labels:
    seq2seq for an encoder-decoder with a seq2seq LM head, causal-lm for a decoder-only
    model, else None."""
    if has_head(config, "seq2seq-lm"):
        return "seq2seq"
    if has_head(config, "causal-lm"):
        return "causal-lm"
    return None


def check_model_task(config: Any, task: Task, path: object) -> None:
    """Refuse a task the model's architecture has no head for (a usage error naming it)."""
    if has_head(config, task.head):
        return
    able = {
        "causal-lm": "decoder-only models (GPT-2, Llama, BLOOM)",
        "seq2seq-lm": "encoder-decoder models (T5, BART)",
        "sequence-classification": "models with a sequence-classification head",
    }[task.head]
    raise UsageError(
        f"{path} is a {config.model_type} model, which has no {task.name} head in "
        f"transformers: {task.name} trains {able}",
        hint="pick the task with --task, or a model of that kind",
    )


def head_task(config: Any) -> str | None:
    """The task of the trained head `config.architectures` names: classification or
    regression (a one-output or `problem_type: regression` sequence classifier), causal-lm,
    seq2seq; None for a base model or another head."""
    head = trained_head(config)
    if head == "sequence-classification":
        regression = getattr(config, "problem_type", None) == "regression" or (
            config.num_labels == 1 and getattr(config, "problem_type", None) is None
        )
        return "regression" if regression else "classification"
    return {"causal-lm": "causal-lm", "seq2seq-lm": "seq2seq"}.get(head or "")


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    accelerator: Any,
    model: nn.Module,
    loader: Any,
    task: Task,
    *,
    generation: Callable[..., dict[str, float]] | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, float]:
    """The task's metrics (`task.metrics`) and `rows` of `model` on the batches of `loader`
    (prepared by `accelerator`: every process's share gathered, each row counted once), and
    with `generation` (`training.generation.Generation`) its `exact_match`. The model is left
    in eval mode; each MPO weight (and parametrized weight: apet) is rebuilt once, not once
    per batch. `train` (every
    evaluation) and `eval` both score through here."""
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    scorer = task.scorer()
    total = len(loader)
    with reuse_dense_weights(unwrapped), parametrize.cached():
        for i, batch in enumerate(loader, 1):
            inputs = model_inputs(unwrapped, batch)
            labels = inputs.pop("labels")
            scorer.add(accelerator, model(**inputs).logits, labels)
            if progress is not None:
                progress("eval", i, total)
    scores = scorer.result()
    if generation is not None:
        scores.update(generation(accelerator, unwrapped, progress))
    return scores
