"""`mposurgeon export-peft`: parse flags, call the stage, render the result."""

from __future__ import annotations

from typing import Annotated

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import ExportPeftJson, emit, input_of
from mposurgeon.cli.render import progress_bar, stdout


@opt.shared_flags("output", "workdir", "overwrite", "no_verify", "json_out", *opt.PROGRESS_FLAGS)
def export_peft_command(
    artifact: Annotated[
        str, typer.Argument(help="Artifact of train --method lora, ia3 or prompt-tuning.")
    ],
    *,
    flags: opt.StageFlags,
) -> None:
    """Write a LoRA, IA3 or prompt-tuning artifact as a PEFT adapter directory (adapter_config.json,
    adapter_model.safetensors) that peft.PeftModel.from_pretrained(base, DIR) loads.

    Example:

        mposurgeon export-peft mposurgeon-out/minilm/v2-train -o minilm-lora-adapter
    """
    from mposurgeon.stages.export_peft import ExportPeftOptions, export_peft

    options = ExportPeftOptions(**flags.stage_kwargs())
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = export_peft(artifact, options, progress=progress)
    if flags.json_out:
        emit(
            ExportPeftJson,
            input=input_of(artifact, flags),
            output=result.output,
            method=result.method,
            peft_type=result.peft_type,
            modules=result.modules,
            base_model=result.base_model,
            task_type=result.task_type,
        )
        return
    stdout.print(
        f"exported {result.method} ({result.modules} module{'s' if result.modules != 1 else ''}) "
        f"as a PEFT {result.peft_type} "
        f"adapter (task {result.task_type or '-'}) for base model {result.base_model}",
        markup=False,
    )
    stdout.print(f"wrote {result.output}  (load: peft.PeftModel.from_pretrained(base, DIR))")
