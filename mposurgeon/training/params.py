"""Which parameters train in each mode, the optimizer's parameter groups, and decomposing the
dense matrices of a live model in place (OPF's selected matrices, dynamic rounds).

Modes (ALGORITHMS.md sections 2 and 3):

- `full`: every parameter trains (dense fine-tuning: the baseline).
- `lightweight` (MPOP): the central core of every MPO is frozen; auxiliary cores, biases, norm
  layers (LayerNorm, RMSNorm) and the task head train; every other weight (embeddings, dense
  matrices) stays frozen.
- `overparam` (OPF): every parameter trains, all MPO cores (central included) and the rest.

The task head is every parameter outside `model.base_model` (BERT `classifier`, RoBERTa and
BART `classification_head` / `classifier.*`, GPT-2/Llama/BLOOM `score`, ...). Parameters are
named as `model.named_parameters()` names them (live names); tied parameters count once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mposurgeon.artifact.naming import core_key
from mposurgeon.models.layers import MPOCores
from mposurgeon.models.surgery import MPOModuleState, install_mpo_layers
from mposurgeon.mpo.decomposition import decompose, to_matrix
from mposurgeon.mpo.metrics import relative_error
from mposurgeon.mpo.shapes import MPOShape, plan_shape

Mode = Literal["full", "lightweight", "overparam"]
MODES: tuple[Mode, ...] = ("full", "lightweight", "overparam")

_NORM = re.compile(r"(?:Layer|RMS|Group)Norm")


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


def mpo_cores(model: nn.Module) -> dict[str, MPOCores]:
    """Every MPO of the model by the live name of the first layer holding it (tied layers
    share one `MPOCores`, listed once)."""
    found: dict[str, MPOCores] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        cores = getattr(module, "mpo", None)
        if isinstance(cores, MPOCores) and id(cores) not in seen:
            seen.add(id(cores))
            found[name] = cores
    return found


def set_trainable(model: nn.Module, mode: Mode) -> None:
    """Set `requires_grad` of every parameter for `mode` (see the module docstring)."""
    everything = mode != "lightweight"
    for p in model.parameters():
        p.requires_grad_(everything)
    if everything:
        return
    for module in model.modules():
        if is_norm(module):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    head = head_parameter_names(model)
    for name, p in model.named_parameters():
        if name in head or name.endswith(".bias"):
            p.requires_grad_(True)
    for cores in mpo_cores(model).values():
        for k, core in enumerate(cores.core):
            core.requires_grad_(k != cores.central_index)


def trained_core_indices(model: nn.Module) -> dict[str, list[int]]:
    """Per MPO (live layer name), the indices of the cores that train."""
    return {
        name: [k for k, c in enumerate(cores.core) if c.requires_grad]
        for name, cores in mpo_cores(model).items()
    }


@dataclass(frozen=True)
class ParamCount:
    """Unique parameters (elements) of a model and how many of them train."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter elements, each tied tensor counted once."""
    params = list(model.parameters())  # deduplicated by identity
    return ParamCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


#: The optimizer's parameter groups, always these three in this order (possibly empty), so
#: that optimizer and scheduler states carry over when cores are added (dynamic selection).
GROUPS = ("mpo", "decay", "no_decay")


def parameter_groups(
    model: nn.Module, *, lr: float, mpo_lr: float | None, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: MPO cores (learning rate `mpo_lr`, default
    `lr`), other weights (weight decay), biases and norm weights (no weight decay)."""
    core_ids = {id(c) for cores in mpo_cores(model).values() for c in cores.core}
    no_decay = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in core_ids:
            groups["mpo"].append(p)
        elif id(p) in no_decay or name.endswith(".bias"):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return [
        {"name": "mpo", "params": groups["mpo"], "lr": lr if mpo_lr is None else mpo_lr,
         "weight_decay": weight_decay},
        {"name": "decay", "params": groups["decay"], "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": lr, "weight_decay": 0.0},
    ]  # fmt: skip


def unique_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict without tied duplicates: ({name: tensor}, {dropped alias: kept name}).

    Tensors sharing storage (tied embeddings, the cores of tied MPO layers) are kept under the
    first name in state-dict order.
    """
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in owner:
            aliases[name] = owner[key]
            continue
        owner[key] = name
        kept[name] = tensor
    return kept, aliases


# -- decomposing live modules ----------------------------------------------------------------


@dataclass
class LiveDecomposition:
    """A dense module of a live model replaced by an MPO layer (lossless TT-SVD)."""

    name: str
    kind: Literal["linear", "conv1d", "embedding"]
    weight_shape: tuple[int, int]
    dtype: torch.dtype
    shape: MPOShape
    cores: list[Tensor]
    spectra: list[Tensor]
    rel_error: float
    predicted_error: float
    tied_names: list[str] = field(default_factory=list)


def _kind(module: nn.Module) -> Literal["linear", "conv1d", "embedding"]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    raise TypeError(f"{type(module).__name__} is not a Linear, Conv1D or Embedding")


def _tied_to(model: nn.Module, name: str, weight: nn.Parameter) -> list[str]:
    """Live names of the other modules holding the very same weight Parameter."""
    return [
        other
        for other, module in model.named_modules(remove_duplicate=False)
        if other != name and getattr(module, "weight", None) is weight
    ]


def decompose_in_place(
    model: nn.Module, names: Iterable[str], num_cores: int = 5
) -> list[LiveDecomposition]:
    """Replace the dense modules `names` (live names) by lossless MPO layers, in place.

    Each weight is factorized as stored now (trained or not) with balanced automatic modes
    (`plan_shape`); the MPO layer keeps the module's bias Parameter itself (same object, so an
    optimizer's state for it carries over). Tied modules get layers sharing the same cores.
    """
    done: list[LiveDecomposition] = []
    for name in names:
        module = model.get_submodule(name)
        kind = _kind(module)
        weight = module.weight
        matrix = weight.detach().t() if kind == "conv1d" else weight.detach()
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        shape = plan_shape(int(matrix.shape[0]), int(matrix.shape[1]), num_cores)
        result = decompose(matrix.to(work), shape)
        cores = [c.to(weight.dtype).contiguous() for c in result.cores]
        error = relative_error(matrix.to(work), to_matrix([c.to(work) for c in cores], shape))
        tied = _tied_to(model, name, weight)
        old = {n: model.get_submodule(n) for n in [name, *tied]}
        state = MPOModuleState(name=name, kind=kind, shape=shape, cores=cores, tied_names=tied)
        installed = install_mpo_layers(model, [state])
        for live, layer in installed.items():
            bias = getattr(old[live], "bias", None)
            if isinstance(bias, nn.Parameter) and isinstance(layer.bias, nn.Parameter):
                layer.bias = bias
        done.append(
            LiveDecomposition(
                name=name,
                kind=kind,
                weight_shape=(int(weight.shape[0]), int(weight.shape[1])),
                dtype=weight.dtype,
                shape=shape,
                cores=list(installed[name].mpo.core),
                spectra=result.spectra,
                rel_error=error,
                predicted_error=result.predicted_error,
                tied_names=tied,
            )
        )
    return done


def install_cores(
    model: nn.Module, structure: dict[str, dict[str, Any]], tensors: dict[str, Tensor]
) -> list[str]:
    """Install MPO layers described by `structure` ({live name: {out_dim, in_dim, out_modes,
    in_modes, tied}}) with cores `tensors[core_key(name, k)]`, for the names that are not
    MPO layers yet (resuming a run whose dynamic rounds decomposed them). Returns those names."""
    present = set(mpo_cores(model))
    states: list[MPOModuleState] = []
    for name, info in structure.items():
        if name in present:
            continue
        shape = MPOShape(info["out_dim"], info["in_dim"], info["out_modes"], info["in_modes"])
        cores = [tensors[core_key(name, k)] for k in range(shape.num_cores)]
        old = model.get_submodule(name)
        kind = _kind(old)
        states.append(MPOModuleState(name, kind, shape, cores, tied_names=info.get("tied", [])))
    install_mpo_layers(model, states)
    return [s.name for s in states]


def mpo_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What `install_cores` needs to rebuild the model's MPO layers: shapes and tied names."""
    structure: dict[str, dict[str, Any]] = {}
    for name, cores in mpo_cores(model).items():
        s = cores.shape
        tied = [
            other
            for other, m in model.named_modules(remove_duplicate=False)
            if other != name and getattr(m, "mpo", None) is cores
        ]
        structure[name] = {**s.to_dict(), "tied": tied}
    return structure
