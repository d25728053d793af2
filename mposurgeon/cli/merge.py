"""`mposurgeon merge`: parse flags, call the stage, render the result."""

from __future__ import annotations

from typing import Annotated

import typer

from mposurgeon.cli import options as opt
from mposurgeon.cli.json_schema import (
    MergeJson,
    emit,
    model_counts,
    params_from_counts,
    source_of,
    total_of,
)
from mposurgeon.cli.render import progress_bar, stdout


@opt.shared_flags(*opt.ARTIFACT_STAGE_FLAGS)
def merge_command(
    artifact: Annotated[
        str,
        typer.Argument(
            help="Artifact directory (decompose/train output), or a PEFT adapter directory."
        ),
    ],
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="auto (each weight's original dtype), float32, float16, bfloat16."
        ),
    ] = "auto",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Run the factorized (or PEFT) and the merged model on sample input; exit 3 if "
            "they differ.",
        ),
    ] = False,
    base: opt.PeftBase = None,
    push_to_hub: opt.PushToHub = None,
    private: opt.Private = False,
    device: opt.Device = "auto",
    *,
    flags: opt.StageFlags,
) -> None:
    """Contract MPO cores back into dense weights: a plain checkpoint `from_pretrained` loads.

    A PEFT adapter directory (adapter_config.json, adapter_model.safetensors: LoRA, IA3) is
    folded into its base model, --base or the one its config records (local files only).

    Example:

        mposurgeon merge mposurgeon-out/bert-base-uncased/v1-decompose -o bert-dense --verify

        mposurgeon merge my-lora-adapter --base minilm -o minilm-lora-merged --verify

        mposurgeon merge mposurgeon-out/minilm/v2-train -o minilm-sst2 --push-to-hub me/minilm-sst2
    """
    from mposurgeon.stages.merge import MergeOptions, merge

    options = MergeOptions(
        dtype=dtype,
        verify=verify,
        device=device,  # type: ignore[arg-type]
        base=base,
        push_to_hub=push_to_hub,
        private=private,
        **flags.stage_kwargs(),
    )
    with progress_bar(flags.no_progress, flags.log_format, flags.log_interval) as progress:
        result = merge(artifact, options, progress=progress)
    cmp = result.comparison
    if flags.json_out:
        source, counts = source_of(artifact, flags)
        emit(
            MergeJson,
            input=source,
            output=result.output,
            params=params_from_counts(model_counts(result.output), before=total_of(counts)),
            merged_modules=result.merged_modules,
            verify=None
            if cmp is None
            else {
                "ok": cmp.ok,
                "max_abs_diff": cmp.max_abs_diff,
                "tolerance": cmp.tolerance,
                "max_abs_value": cmp.max_abs_value,
            },
            peft_type=result.peft_type,
            base=result.base,
            architecture=result.architecture,
            commit_url=result.commit_url,
        )
        return
    if result.peft_type is not None:
        stdout.print(
            f"merged {result.merged_modules} {result.peft_type} modules into the dense weights "
            f"of {result.base}",
            markup=False,
        )
    elif result.architecture is not None:
        stdout.print(
            f"merged {result.merged_modules} modules, their mixtures of experts as "
            f"{result.architecture} experts with dense weights"
        )
    else:
        stdout.print(f"merged {result.merged_modules} MPO modules into dense weights")
    if cmp is not None:
        stdout.print(
            f"verify: OK, max |{'adapter' if result.peft_type else 'factorized'} - merged| = "
            f"{cmp.max_abs_diff:.2e} "
            f"(tolerance {cmp.tolerance:.1e}, outputs up to {cmp.max_abs_value:.2f})"
        )
    stdout.print(f"wrote {result.output}")
    if result.commit_url is not None:
        stdout.print(f"pushed to {push_to_hub}: {result.commit_url}", markup=False)
