"""What the methods that `peft` injects in place (`lora`, `ia3`) share: PEFT's default targets
per model type, the layer kinds one PEFT config can hold, and the adapter name.

`peft.inject_adapter_in_model` puts PEFT's layers on the named modules without a `PeftModel`
wrapper, so module names stay the model's; PEFT's live names (`M.base_layer.weight`,
`M.lora_A.default.weight`, `M.ia3_l.default`) are mapped to the artifact's by each method's
`file_key`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from torch import Tensor, nn
from torch.nn.utils import parametrize

from mposurgeon.errors import UsageError
from mposurgeon.methods.config import names_regex
from mposurgeon.models.groups import Target
from mposurgeon.models.pruning import KeepZerosBeside

#: The adapter name PEFT's layers are injected under (and exported with).
ADAPTER = "default"


def peft_default_targets(
    model: nn.Module, method: str, mapping: Mapping[str, Sequence[str]], example: str
) -> str:
    """PEFT's default targets of the model type (`mapping`, one of PEFT's
    TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING), as a regex of whole module names:
    PEFT matches a name by its last components."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = mapping.get(model_type or "")
    if not names:
        raise UsageError(
            f"{method} has no default targets for model type {model_type!r}",
            hint=f"name them with --layers (e.g. {example}) or --target-modules",
        )
    return names_regex(names)


def fan_in_fan_out(targets: Sequence[Target], method: str) -> bool:
    """Whether the targets are GPT-2 Conv1D layers (PEFT's `fan_in_fan_out`); an embedding,
    or a mix of Conv1D and Linear layers (which one PEFT config cannot hold), is refused."""
    kinds = {t.kind for t in targets}
    if "embedding" in kinds:
        raise UsageError(
            f"{method} adapts Linear and Conv1D layers: the targets include an embedding",
            hint="leave embeddings out of --layers / --target-modules",
        )
    if kinds == {"conv1d", "linear"}:
        raise UsageError(
            f"{method}: the targets mix GPT-2 Conv1D and Linear layers, which one PEFT "
            "config cannot hold",
            hint="target one kind (e.g. --layers attention,FFN_1,FFN_2)",
        )
    return kinds == {"conv1d"}


def inject_lora(
    model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float, *, conv1d: bool
) -> None:
    """Put PEFT's LoRA layers (rank `rank`, scale alpha / rank) on the modules `names` (whole
    names) of `model`, in place, under `ADAPTER`."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        fan_in_fan_out=conv1d,
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def keep_lora_zeros(layer: nn.Module, pruned: Tensor) -> None:
    """Make PEFT's LoRA layer `layer` compute its pruned merged weight ((W + ΔW) with the
    `pruned` entries zero, W as `layer.base_layer` stores it) by a last parametrization of the
    base weight (`KeepZerosBeside`); its live name becomes
    `base_layer.parametrizations.weight.original`."""
    base = layer.base_layer
    delta = partial(layer.get_delta_weight, ADAPTER)
    pruned = pruned.to(base.weight.device)
    parametrize.register_parametrization(base, "weight", KeepZerosBeside(pruned, delta))
