"""What a method implements: how it trains a live model, and how the module state it owns is
stored, merged and loaded.

A `Method` is built from its config (`methods/config.py`) by `registry.get_method`. Training
calls, in order: `check_source` (refuse an input the method cannot train, before any work),
`prepare` (install the method's layers into the live model), `keep_zeros` for each pruned
module of a `prune` input, then, each time the optimizer is
built, `set_trainable` and `parameter_groups`, and at the end `trained_records`. The artifact
side works on the records whose `method` is this method's name (the record class names the
tensors it owns: `ModuleRecord.tensor_shapes`): `to_dense` and `dense_tensors` (for `merge`)
and `install` (for `load_model`).

Methods know models and math, never files, stages or the terminal: tensors come in as
mappings of name to tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.utils import parametrize

from mposurgeon.errors import UsageError
from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.peft_layers import keep_lora_zeros
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.layers import ForwardMode, MPOEmbedding, MPOLinear
from mposurgeon.models.orientation import Kind, as_weight
from mposurgeon.models.pruning import KeepZeros

_NORM = re.compile(r"(?:Layer|RMS|Group)Norm")


@dataclass(frozen=True)
class TrainingSource:
    """What a method may check about the model it is asked to train: its path (for messages),
    the input's module records (file names), the matrices a `select` stage chose, and whether
    matrices will be chosen during training (dynamic selection)."""

    path: str
    records: Mapping[str, ModuleRecord] = field(default_factory=dict)
    chosen: Sequence[str] = ()
    dynamic: bool = False


class Method:
    """The implementation of one method (see the module doc for the order of the calls)."""

    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @property
    def name(self) -> str:
        return self.config.name

    # -- training ----------------------------------------------------------------------------

    def check_source(self, source: TrainingSource) -> None:
        """Raise a `UsageError` when this method cannot train `source`."""
        if not self.config.trains:
            raise UsageError(f"{self.name} is not a training method")

    def prepare(
        self, model: nn.Module, records: dict[str, ModuleRecord], chosen: Sequence[str]
    ) -> dict[str, ModuleRecord]:
        """Install the method's layers into `model` (live names); return the records of the
        modules it transformed. `records` are the input's records under live names, `chosen`
        a `select` stage's matrices (live names)."""
        return {}

    def set_trainable(self, model: nn.Module) -> None:
        """Set `requires_grad` of every parameter of `model`."""
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters, each with `name`, `params`, `lr` and
        `weight_decay`; the same names in the same order every time (the loop rebuilds the
        optimizer when parameters are added, and the schedule carries over by position)."""
        decay, no_decay = split_decay(model)
        lr = self.config.lr
        return [
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]

    def keep_zeros(self, model: nn.Module, name: str, pruned: Tensor, kind: Kind) -> None:
        """Make module `name` (live) of a prepared model compute with its pruned entries
        (`pruned`, bool, its weight as `kind` stores it) zero whatever trains, so training
        sees the weight that `merge` writes. The stored weight itself is kept at zero by the
        stage (`keep_pruned`); this covers what is stacked on it: MPO layers rebuild their
        matrix masked, PEFT's LoRA layers (LoRA, DSEE) compute with the masked merged weight,
        and a weight parametrization (APET's sparse delta) gets `KeepZeros` last."""
        module = model.get_submodule(name)
        if isinstance(module, MPOLinear | MPOEmbedding):
            module.mpo.keep_zeros(as_weight(pruned, kind))  # (out_dim, in_dim), a transpose
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            keep_lora_zeros(module, pruned)
        elif parametrize.is_parametrized(module, "weight"):
            pruned = pruned.to(module.weight.device)
            parametrize.register_parametrization(module, "weight", KeepZeros(pruned))

    def training_loss(self, model: nn.Module) -> Tensor | None:
        """A loss the method adds to the task's after each forward in training (MPOE's
        load-balancing loss), or None."""
        return None

    def before_optimizer_step(self, model: nn.Module, step: int, seed: int) -> None:
        """Called with the gradients of optimizer step `step` (0-based) in place, before the
        step (MPOE's gradient mask); `seed` is the run's."""

    def training_metrics(self, model: nn.Module) -> dict[str, Any]:
        """JSON metrics the method adds to the trained artifact's (MPOE's expert load)."""
        return {}

    def live_structure(self, model: nn.Module) -> dict[str, Any]:
        """JSON data that `restore_structure` needs to rebuild the method's layers that
        training added to a freshly prepared model (checkpoints of a run)."""
        return {}

    def restore_structure(
        self, model: nn.Module, structure: Mapping[str, Any], tensors: Mapping[str, Tensor]
    ) -> None:
        """Rebuild the layers `live_structure` described, before the weights are loaded."""

    def trained_records(
        self, model: nn.Module, records: dict[str, ModuleRecord]
    ) -> dict[str, ModuleRecord]:
        """The records of the trained model's transformed modules (live names)."""
        return dict(records)

    def file_key(self, live_key: str) -> str:
        """The name the artifact stores the live tensor `live_key` under (its record's
        names: what `install` reads back after `from_pretrained` loads the rest)."""
        return live_key

    # -- the module state it owns ------------------------------------------------------------

    #: Whether `to_dense` gives the module's weight (merge checks it before any work).
    has_dense_form: ClassVar[bool] = False

    def to_dense(self, record: ModuleRecord, tensors: Mapping[str, Tensor]) -> Tensor:
        """The dense weight of `record`'s module, oriented as the original checkpoint stored
        it, from its tensors, in float32 or float64 (merge casts it to `record.dtype`);
        refuse with a `UsageError` if the state has no dense form."""
        raise self.no_dense_form(record)

    def dense_tensors(
        self, record: ModuleRecord, tensors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Every tensor of the merged checkpoint that `record`'s state gives, by name: its
        dense weight (`to_dense`), and any other tensor of the original module the method
        changed (IA3's scaled bias), in float32 or float64."""
        return {record.weight_key: self.to_dense(record, tensors)}

    def no_dense_form(self, record: ModuleRecord) -> UsageError:
        """The error `merge` gives for a module whose state no dense weight can hold."""
        export = (
            ", or hand it to PEFT with `mposurgeon export-peft`" if self.exports_to_peft else ""
        )
        return UsageError(
            f"{record.name}: the {self.name} method adds computation that no dense weight "
            "can hold, so merge cannot fold it",
            hint=f"run the artifact with `mposurgeon.load_model(ARTIFACT)`{export}",
        )

    # -- PEFT interop (export-peft) ----------------------------------------------------------

    @property
    def exports_to_peft(self) -> bool:
        """Whether PEFT knows the method (`peft_config` is implemented)."""
        return type(self).peft_config is not Method.peft_config

    def peft_config(self, records: Sequence[ModuleRecord], **common: Any) -> Any:
        """The `peft.PeftConfig` of an adapter holding `records` (file names), with
        `common` (task_type, modules_to_save, base_model_name_or_path) passed through."""
        raise NotImplementedError(f"PEFT has no {self.name} adapters")

    def copy_to_peft(
        self, peft_model: Any, records: Sequence[ModuleRecord], tensors: Mapping[str, Tensor]
    ) -> None:
        """Copy the trained tensors of `records` into `peft_model` (a `PeftModel` made by
        `peft.get_peft_model` with `peft_config(records)`)."""
        raise NotImplementedError(f"PEFT has no {self.name} adapters")

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        """Put the method's layers for `records` (file names) into a freshly loaded `model`."""
        if records:
            raise NotImplementedError(f"{self.name} cannot load modules")


# -- helpers every method uses -----------------------------------------------------------------


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their per-architecture variants (T5LayerNorm, LlamaRMSNorm...)."""
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or bool(
        _NORM.search(type(module).__name__)
    )


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the task head's parameters: those outside `model.base_model`."""
    base = getattr(model, "base_model", model)
    if base is model:
        return set()
    inside = {id(p) for p in base.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in inside}


def input_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """The live name and module of the model's input (word) embeddings."""
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            return name, module
    raise UsageError(f"{type(model).__name__} has no input embeddings")


def train_only(model: nn.Module, trains: Callable[[str], bool]) -> None:
    """Set `requires_grad` of every parameter of `model`: those whose name `trains` accepts,
    and the task head's (`head_parameter_names`), train; every other one is frozen."""
    head = head_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name) or name in head)


def split_decay(
    model: nn.Module, exclude: set[int] | None = None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters not in `exclude` (ids): (weights, biases and norm weights),
    the second without weight decay."""
    exclude = exclude or set()
    no_decay_ids = {
        id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        if id(p) in no_decay_ids or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay
