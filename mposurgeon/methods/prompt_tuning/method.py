"""`prompt-tuning`: the prompt lives on the input-embedding module (`E.prompt`, a parameter of
shape (num_virtual_tokens, hidden)); a forward pre-hook on the model prepends it to the input
embeddings as PEFT's `PeftModelFor*` forward does, and a forward hook drops a causal LM's
logits at the prompt positions, so the logits line up with the input as without a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import Method, input_embeddings, train_only
from mposurgeon.methods.prompt_tuning.config import PromptTuningConfig
from mposurgeon.methods.prompt_tuning.record import PromptRecord
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.auto import model_head
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.surgery import resolve_module_name

#: The label of prompt positions for a causal LM's loss (ignored, as PEFT sets it).
IGNORE_INDEX = -100


class PromptTuningMethod(Method):
    config_class: ClassVar[type[PromptTuningConfig]] = PromptTuningConfig
    config: PromptTuningConfig

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        name, embeddings = input_embeddings(model)
        if name in records:
            raise UsageError(
                "prompt-tuning: the input embeddings are transformed (MPO) in this input",
                hint="decompose without the embeddings group to prompt-tune",
            )
        vocab, hidden = embeddings.weight.shape
        length = self.config.length(hidden)
        if length < 1:
            raise UsageError(
                f"prompt-tuning: --budget {self.config.budget:,} is below one virtual token "
                f"({hidden:,} parameters)",
                hint=f"raise --budget to at least {hidden:,}",
            )
        weight = embeddings.weight
        with torch.no_grad():
            if self.config.prompt_init == "vocab":
                rows = torch.randint(0, vocab, (length,)).to(weight.device)
                start = weight[rows].detach().clone()
            else:
                start = torch.randn(length, hidden, dtype=weight.dtype).to(weight.device)
        _add_prompt(model, embeddings, start)
        return {
            name: PromptRecord(
                name=name,
                method=self.name,
                kind="embedding",
                weight_key=f"{name}.weight",
                shape=[vocab, hidden],
                dtype=str(weight.dtype).removeprefix("torch."),
                params=length * hidden,
                dense_params=vocab * hidden,
                num_virtual_tokens=length,
            )
        }

    def set_trainable(self, model: nn.Module) -> None:
        train_only(model, lambda name: name.endswith(".prompt"))

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        for rec in records:
            if isinstance(rec, PromptRecord):
                embeddings = model.get_submodule(resolve_module_name(model, rec.name))
                _add_prompt(model, embeddings, tensors[f"{rec.name}.prompt"])

    # -- PEFT interop -------------------------------------------------------------------------

    def peft_config(self, records: Sequence[ModuleRecord], **common: Any) -> Any:
        import peft

        (rec,) = [r for r in records if isinstance(r, PromptRecord)]
        if common.get("task_type") == "SEQ_2_SEQ_LM":
            raise UsageError(
                "export-peft: PEFT prompts a seq2seq model's encoder and decoder both, "
                "which a prompt-tuning artifact (encoder only) cannot give",
                hint="run the artifact with `mposurgeon.load_model(ARTIFACT)`",
            )
        return peft.PromptTuningConfig(
            num_virtual_tokens=rec.num_virtual_tokens, token_dim=rec.shape[1], **common
        )

    def copy_to_peft(
        self, peft_model: Any, records: Sequence[ModuleRecord], tensors: Mapping[str, Tensor]
    ) -> None:
        (rec,) = [r for r in records if isinstance(r, PromptRecord)]
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(
                tensors[f"{rec.name}.prompt"]
            )


def _add_prompt(model: nn.Module, embeddings: nn.Module, start: Tensor) -> None:
    """Give `embeddings` the parameter `prompt` (a copy of `start`, (P, hidden)) and `model`
    the hooks that prepend it to every input."""
    weight = embeddings.weight
    embeddings.prompt = nn.Parameter(start.to(device=weight.device, dtype=weight.dtype).clone())
    causal = model_head(model) == "causal-lm"
    classifier = not causal and not getattr(model.config, "is_encoder_decoder", False)
    model.register_forward_pre_hook(
        lambda module, args, kwargs: _prepend(embeddings, args, kwargs, causal, classifier),
        with_kwargs=True,
    )
    if causal:
        length = start.shape[0]
        model.register_forward_hook(lambda module, args, output: _drop_prompt(output, length))
    model.generation_refused_by = "prompt-tuning"  # see training.generation


def _prepend(
    embeddings: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    causal: bool,
    classifier: bool,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model's inputs with the prompt in front: inputs_embeds [prompt; embeddings],
    attention mask and (for a classifier, as PEFT) token types grown by the prompt, position
    ids dropped, a causal LM's labels grown by `IGNORE_INDEX` (token types dropped, as PEFT)."""
    if args:
        kwargs = {"input_ids": args[0], **kwargs}
    if kwargs.get("past_key_values") is not None:
        raise UsageError(
            "prompt-tuning: the model was called with a cache (generation), which its "
            "virtual tokens do not support",
            hint="score it without --generate",
        )
    prompt = embeddings.prompt
    input_ids = kwargs.pop("input_ids", None)
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = embeddings(input_ids)
    batch, length = inputs.shape[0], prompt.shape[0]
    kwargs["inputs_embeds"] = torch.cat(
        (prompt.to(inputs.dtype).unsqueeze(0).expand(batch, -1, -1), inputs), dim=1
    )
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat((mask.new_ones(batch, length), mask), dim=1)
    kwargs["position_ids"] = None
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = (
            torch.cat((types.new_zeros(batch, length), types), dim=1) if classifier else None
        )
    labels = kwargs.get("labels")
    if causal and labels is not None:
        kwargs["labels"] = torch.cat((labels.new_full((batch, length), IGNORE_INDEX), labels), 1)
    return (), kwargs


def _drop_prompt(output: Any, length: int) -> Any:
    """A causal LM's output with the logits of the `length` prompt positions dropped."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        output.logits = logits[:, length:]
    return output
