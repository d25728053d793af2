"""export-peft: write a trained LoRA artifact as a PEFT adapter directory.

The story: open and verify the artifact; every module record must be a `lora` record (the
methods PEFT knows); load the model with its base weights and its trained head (`transformers`
reads the artifact's files; the LoRA factors are left for later); wrap it with
`peft.get_peft_model` under a `LoraConfig` of the artifact's targets, rank and alpha (a
sequence classifier's head as `modules_to_save`: it was trained too); copy the trained
factors in; `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors`.
`peft.PeftModel.from_pretrained(base, DIR)` on the base checkpoint (for a classifier, loaded
with the same number of labels) then gives the artifact's outputs.

The adapter records its base model as the hub id the lineage started from, else its local
path (`base_model_name_or_path`). Nothing is written unless the whole export succeeds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from mposurgeon.artifact.store import atomic_directory, release_claim
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import UsageError
from mposurgeon.methods.base import head_parameter_names
from mposurgeon.methods.lora.record import LoraRecord
from mposurgeon.models.auto import model_class, quiet_transformers, trained_head
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import StageOptions, open_input, plan_output

#: transformers head -> PEFT's task type.
PEFT_TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
}


class ExportPeftOptions(StageOptions):
    """Options of `export-peft` (the CLI flags, one to one)."""


@dataclass
class ExportPeftResult:
    output: Path
    modules: int
    rank: int
    base_model: str
    task_type: str | None


def export_peft(
    artifact: str | Path,
    options: ExportPeftOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> ExportPeftResult:
    """Write the LoRA artifact `artifact` as a PEFT adapter directory."""
    import peft

    opts = options or ExportPeftOptions(**kwargs)  # type: ignore[arg-type]
    inp = open_input(artifact, opts)
    if inp.manifest is None:
        raise UsageError(
            f"{inp.path} is not a mposurgeon artifact (no mposurgeon.json)",
            hint="export-peft reads the output of train --method lora",
        )
    records = list(inp.modules.values())
    others = sorted({r.method for r in records if not isinstance(r, LoraRecord)})
    if not records or others:
        what = f"modules of {', '.join(others)}" if others else "no transformed modules"
        raise UsageError(
            f"{inp.path} has {what}: PEFT adapters hold LoRA updates",
            hint="export the output of train --method lora; merge gives a dense checkpoint "
            "of any artifact",
        )
    lora = [r for r in records if isinstance(r, LoraRecord)]
    settings = {(r.r, r.alpha) for r in lora}
    if len(settings) > 1:
        raise UsageError(f"{inp.path} holds LoRA modules of several ranks: {sorted(settings)}")
    ((rank, alpha),) = settings
    config = AutoConfig.from_pretrained(inp.path)
    head = trained_head(config)
    task_type = PEFT_TASK_TYPES.get(head or "")
    base = inp.base.model_id or inp.base.path
    with quiet_transformers():
        model = model_class(config, head or "auto").from_pretrained(inp.path, config=config)
    model.name_or_path = base  # PEFT records the wrapped model's as the adapter's base
    to_save = _head_modules(model) if head == "sequence-classification" else None
    peft_config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[r.name for r in lora],
        fan_in_fan_out=any(r.kind == "conv1d" for r in lora),
        modules_to_save=to_save,
        task_type=task_type,
        base_model_name_or_path=base,
    )
    with warnings.catch_warnings():  # transformers' deprecation notes, about peft's calls
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, peft_config)
    modules = dict(wrapped.base_model.model.named_modules())
    with open_tensors(inp.path) as reader, torch.no_grad():
        for i, rec in enumerate(lora, 1):
            layer = modules[rec.name]
            for factor in ("A", "B"):
                weight = getattr(layer, f"lora_{factor}")["default"].weight
                weight.copy_(reader.get(f"{rec.name}.lora_{factor}.weight"))
            if progress is not None:
                progress("export", i, len(lora))
    out = plan_output(inp, opts, "export-peft")
    try:
        with atomic_directory(out, overwrite=opts.overwrite) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapped.save_pretrained(tmp)
    except BaseException:
        release_claim(out)  # a versioned directory claimed for this export, never published
        raise
    return ExportPeftResult(out, len(lora), rank, base, task_type)


def _head_modules(model: Any) -> list[str]:
    """The names of the modules holding the task head's parameters (`classifier`, `score`)."""
    names = {name.rsplit(".", 1)[0] for name in head_parameter_names(model)}
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names))
