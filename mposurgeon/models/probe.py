"""Run a model on sample input and compare two models' outputs (for `merge --verify`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SAMPLE_SENTENCES = [
    "Matrix product operators factorize a weight matrix into a chain of small tensors.",
    "The quick brown fox jumps over the lazy dog.",
    "Merged checkpoints must load with transformers and give the same outputs.",
]


def sample_batch(
    config: object, tokenizer: object | None = None, seed: int = 0
) -> dict[str, Tensor]:
    """Model inputs: the tokenized sample sentences, or seeded random token ids (2 x 16)."""
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token  # type: ignore[attr-defined]
        batch = dict(tokenizer(SAMPLE_SENTENCES, padding=True, return_tensors="pt"))  # type: ignore[operator]
    else:
        generator = torch.Generator().manual_seed(seed)
        vocab = int(getattr(config, "vocab_size", 100))
        ids = torch.randint(0, vocab, (2, 16), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    archs = getattr(config, "architectures", None) or [""]
    if getattr(config, "is_encoder_decoder", False) and not archs[0].endswith(
        "ForSequenceClassification"
    ):  # an encoder-decoder classifier feeds its decoder the shifted input_ids itself
        batch["decoder_input_ids"] = batch["input_ids"][:, :8]
    return batch


@torch.no_grad()
def model_output(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's main output (logits or last hidden state), float32, on CPU."""
    accepted = inspect.signature(model.forward).parameters
    out = model(**{k: v for k, v in batch.items() if k in accepted})
    main = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    return main.float().cpu()


@dataclass
class OutputComparison:
    max_abs_diff: float
    max_abs_value: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def compare_outputs(reference: Tensor, other: Tensor, atol: float, rtol: float) -> OutputComparison:
    """Max |reference - other| against atol + rtol * max |reference|."""
    diff = (reference - other).abs().max().item()
    scale = reference.abs().max().item()
    return OutputComparison(diff, scale, atol + rtol * scale)
