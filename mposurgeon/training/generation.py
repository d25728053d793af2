"""Exact match of generated text (`--generate`, causal-lm and seq2seq).

Every row with a reference (a completion or a target) is decoded greedily (no sampling, one
beam) from its input (the prompt, or the source), at most `max_new_tokens` new tokens, until
the EOS token. A row matches when the generated tokens are the reference's tokens as training
encodes them, the tokens that only frame a sequence aside (padding, BOS, EOS, the decoder's
start token): the generated text is then the reference, and neither a tokenizer's spacing or
lower-casing nor a reference longer than `max_new_tokens` tokens can pass for a match or a
mismatch by accident. An unknown word counts as its unknown token.

The inputs are cut to `max_length` tokens as in training; causal inputs are padded on the
left (generation continues the last token of each row). Under several processes each takes
every n-th row and the counts are summed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mposurgeon.errors import UsageError
from mposurgeon.models.auto import quiet_transformers
from mposurgeon.models.layers import reuse_dense_weights
from mposurgeon.progress import ProgressCallback
from mposurgeon.training.data import Example, TextDataset
from mposurgeon.training.tasks import Task, pad_ids


def check_generation(task: Task, data: TextDataset | None, flag: str) -> None:
    """`--generate` needs a generative task and data (`flag` names it) with rows that have a
    reference to match: a completion or a target."""
    if not task.generates:
        raise UsageError(
            f"--generate scores generated text: it applies to causal-lm and seq2seq, not "
            f"{task.name}",
            hint="leave --generate out",
        )
    if data is None:
        raise UsageError("--generate scores the eval data: there is none", hint=f"pass {flag}")
    if not any(ex.target is not None for ex in data.examples):
        raise UsageError(
            f"--generate compares generations with a reference, and {data.name} has none "
            "(plain text)",
            hint="give the eval data prompt and completion (or source and target) columns",
        )


class GenerationOptions(Protocol):
    """The options `--generate` reads (train's and eval's)."""

    generate: bool
    max_length: int
    max_new_tokens: int
    batch_size: int


def generation_for(
    options: GenerationOptions, task: Task, data: TextDataset | None, tokenizer: Any
) -> Generation | None:
    """The exact-match scorer of `data` that `options` ask for (`--generate`), else None."""
    if not options.generate or data is None:
        return None
    return Generation(
        data,
        tokenizer,
        task,
        max_length=options.max_length,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
    )


@dataclass
class Generation:
    """Scores `exact_match` of the rows of `data` that have a reference."""

    data: TextDataset
    tokenizer: Any
    task: Task
    max_length: int
    max_new_tokens: int
    batch_size: int

    @property
    def causal(self) -> bool:
        """Whether the model continues its input (causal-lm) rather than answering it."""
        return self.task.shift

    @property
    def examples(self) -> list[Example]:
        return [ex for ex in self.data.examples if ex.target is not None]

    @torch.no_grad()
    def __call__(
        self, accelerator: Any, model: nn.Module, progress: ProgressCallback | None = None
    ) -> dict[str, float]:
        """`exact_match` (the fraction of rows whose generated text is the reference) and
        `generated_rows`. `model` is unwrapped (generate is not part of DDP's forward)."""
        refused_by = getattr(model, "generation_refused_by", None)
        if refused_by is not None:
            raise UsageError(
                f"{refused_by} models cannot generate here: their virtual tokens need a cache "
                "that generation does not keep",
                hint="score loss and perplexity without --generate",
            )
        mine = self.examples[accelerator.process_index :: accelerator.num_processes]
        model.eval()
        matches = 0
        batches = range(0, len(mine), self.batch_size)
        with reuse_dense_weights(model), quiet_transformers():
            for i, start in enumerate(batches, 1):
                chunk = mine[start : start + self.batch_size]
                generated = self._generate(model, [ex.text for ex in chunk])
                references = [self._reference(ex.target or "") for ex in chunk]
                matches += sum(g == r for g, r in zip(generated, references, strict=True))
                if progress is not None:
                    progress("generate", i, len(batches))
        counts = torch.tensor([matches, len(mine)], dtype=torch.long)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        total = int(counts[1])
        return {
            "exact_match": float(counts[0]) / total if total else float("nan"),
            "generated_rows": total,
        }

    def _framing(self) -> set[int]:
        """Ids of the tokens that only frame a sequence: pad, BOS, EOS."""
        tok = self.tokenizer
        ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        return {i for i in ids if i is not None}

    def _reference(self, text: str) -> list[int]:
        """The tokens of a reference as training encodes it, framing tokens aside."""
        if self.causal:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(text_target=text)["input_ids"]
        framing = self._framing()
        return [i for i in ids if i not in framing]

    def _generate(self, model: nn.Module, inputs: list[str]) -> list[list[int]]:
        """The greedy continuation of every input: its tokens up to the first EOS, framing
        tokens (and the decoder's start token) aside."""
        tok = self.tokenizer
        ids = [row[: self.max_length] for row in tok(inputs)["input_ids"]]
        masks = [[1] * len(row) for row in ids]
        device = next(model.parameters()).device
        input_ids = pad_ids(ids, tok.pad_token_id, left=self.causal).to(device)
        attention = pad_ids(masks, 0, left=self.causal).to(device)
        config = self._config(model)
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=attention, generation_config=config
        )
        # a causal model's output holds its input; a seq2seq one starts with the start token
        out = out[:, input_ids.shape[1] :] if self.causal else out[:, 1:]
        eos = config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        framing = self._framing()
        rows = []
        for row in out.tolist():
            end = next((k for k, t in enumerate(row) if t in stops), len(row))
            rows.append([t for t in row[:end] if t not in framing])
        return rows

    def _config(self, model: nn.Module) -> Any:
        """The model's generation config, made greedy and bounded."""
        config = copy.deepcopy(model.generation_config)
        config.update(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config
