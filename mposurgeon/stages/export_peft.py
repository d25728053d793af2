"""export-peft: write a trained LoRA, IA3 or prompt-tuning artifact as a PEFT adapter directory.

The story: open and verify the artifact; its module records must all be of one method that
PEFT knows (`Method.exports_to_peft`); load the model with its base weights and its trained
head (`transformers` reads the artifact's files; the method's tensors are left for later);
wrap it with `peft.get_peft_model` under the method's `peft_config` (its targets, rank...; a
sequence classifier's head as `modules_to_save`: it was trained too); copy the trained
tensors in (`copy_to_peft`); `save_pretrained` writes `adapter_config.json` and
`adapter_model.safetensors`.
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

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.store import atomic_directory, release_claim
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import UsageError
from mposurgeon.methods.base import Method, head_parameter_names
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.methods.registry import get_method, method_names
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
    method: str
    peft_type: str  # PEFT's name: LORA, IA3, PROMPT_TUNING
    modules: int
    base_model: str
    task_type: str | None


def export_peft(
    artifact: str | Path,
    options: ExportPeftOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: object,
) -> ExportPeftResult:
    """Write the artifact `artifact` (LoRA, IA3, prompt tuning) as a PEFT adapter directory."""
    import peft

    opts = options or ExportPeftOptions(**kwargs)  # type: ignore[arg-type]
    inp = open_input(artifact, opts)
    if inp.manifest is None:
        raise UsageError(
            f"{inp.path} is not a mposurgeon artifact (no mposurgeon.json)",
            hint="export-peft reads the output of train --method lora, ia3 or prompt-tuning",
        )
    records = list(inp.modules.values())
    method = _peft_method(inp.path, records)
    config = read_config(inp.path)
    head = trained_head(config)
    task_type = PEFT_TASK_TYPES.get(head or "")
    base = inp.base.model_id or inp.base.path
    with quiet_transformers():
        model = model_class(config, head or "auto").from_pretrained(inp.path, config=config)
    model.name_or_path = base  # PEFT records the wrapped model's as the adapter's base
    to_save = _head_modules(model) if head == "sequence-classification" else None
    peft_config = method.peft_config(
        records, modules_to_save=to_save, task_type=task_type, base_model_name_or_path=base
    )
    with warnings.catch_warnings():  # transformers' deprecation notes, about peft's calls
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, peft_config)
    with open_tensors(inp.path) as reader:
        method.copy_to_peft(wrapped, records, reader)
    if progress is not None:
        progress("export", 1, 1)
    out = plan_output(inp, opts, "export-peft")
    try:
        with atomic_directory(out, overwrite=opts.overwrite) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapped.save_pretrained(tmp, save_embedding_layers=False)  # never looks up the hub
    except BaseException:
        release_claim(out)  # a versioned directory claimed for this export, never published
        raise
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    return ExportPeftResult(out, method.name, peft_type, len(records), base, task_type)


def _peft_method(path: Path, records: list[ModuleRecord]) -> Method:
    """The one method of `records`, which PEFT must know."""
    names = sorted({r.method for r in records})
    methods = [get_method(name) for name in names]
    if len(methods) == 1 and methods[0].exports_to_peft:
        return methods[0]
    known = [name for name in method_names(training=True) if get_method(name).exports_to_peft]
    what = f"modules of {', '.join(names)}" if names else "no transformed modules"
    raise UsageError(
        f"{path} has {what}: a PEFT adapter holds one method PEFT knows ({', '.join(known)})",
        hint="merge gives a dense checkpoint of any artifact with a dense form",
    )


def _head_modules(model: Any) -> list[str]:
    """The names of the modules holding the task head's parameters (`classifier`, `score`)."""
    names = {name.rsplit(".", 1)[0] for name in head_parameter_names(model)}
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names))
