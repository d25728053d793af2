"""MPO module state: factorizing one matrix, its record, reading its cores back, and MPO
layers in a live model (installed from cores, or decomposed in place during training).

Names: records use the checkpoint files' module names; live models may carry a
`base_model_prefix` the files lack (see `models/surgery.resolve_module_name`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mposurgeon.errors import ArtifactError
from mposurgeon.methods.mpo.record import MPORecord, core_key
from mposurgeon.models.layers import Fixup, MPOCores, cores_fingerprint
from mposurgeon.models.orientation import Kind, as_matrix, as_weight
from mposurgeon.models.surgery import MPOModuleState, install_mpo_layers, module_kind
from mposurgeon.mpo.contract import to_matrix
from mposurgeon.mpo.decomposition import decompose
from mposurgeon.mpo.metrics import entanglement_entropy, num_params, relative_error
from mposurgeon.mpo.shapes import MPOShape, bonds_of, plan_shape


@dataclass
class FactorizedMatrix:
    """One weight factorized: cores (in the output dtype), full bond spectra before any cut,
    the measured and predicted relative errors, and `matrix`, the contraction of the stored
    cores the error was measured on ((out_dim, in_dim), float32 or float64, as merge
    contracts them)."""

    cores: list[Tensor]
    spectra: list[Tensor]
    rel_error: float
    predicted_error: float
    matrix: Tensor


def factorize_weight(
    weight: Tensor,
    kind: Kind,
    shape: MPOShape,
    *,
    dtype: torch.dtype | None = None,
    max_bond: int | Sequence[int] | None = None,
    rel_tol: float | None = None,
) -> FactorizedMatrix:
    """TT-SVD of a weight as `kind` stores it; cores in `dtype` (default the weight's), the
    SVD in float64 for float64 weights and float32 otherwise. `rel_error` compares the matrix
    with the contraction of the stored (cast) cores."""
    out_dtype = dtype or weight.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    reference = as_matrix(weight, kind)  # not widened: decompose and the error convert it
    if reference.dtype == torch.float64 and work != torch.float64:
        reference = reference.to(work)  # the SVD runs in float32: so does the error
    result = decompose(reference, shape, max_bond=max_bond, rel_tol=rel_tol, dtype=work)
    cores = [c.to(out_dtype).contiguous() for c in result.cores]
    matrix = to_matrix([c.to(work) for c in cores], shape)
    error = relative_error(reference, matrix)
    return FactorizedMatrix(cores, result.spectra, error, result.predicted_error, matrix)


def mpo_record(
    *,
    name: str,
    kind: Kind,
    weight_shape: Sequence[int],
    dtype: torch.dtype,
    shape: MPOShape,
    factorized: FactorizedMatrix,
    tied_keys: Sequence[str] = (),
) -> MPORecord:
    """The record of a freshly factorized matrix. `weight_shape` and `dtype` are the original
    weight's (as stored)."""
    cores = factorized.cores
    bonds = bonds_of(cores)
    return MPORecord(
        name=name,
        kind=kind,
        weight_key=f"{name}.weight",
        shape=list(weight_shape),
        dtype=str(dtype).removeprefix("torch."),
        out_dim=shape.out_dim,
        in_dim=shape.in_dim,
        out_modes=list(shape.out_modes),
        in_modes=list(shape.in_modes),
        out_padding=shape.out_padding,
        in_padding=shape.in_padding,
        bonds=list(bonds),
        central_index=shape.central_index,
        rel_error=factorized.rel_error,
        predicted_error=factorized.predicted_error,
        params=num_params(cores),
        dense_params=shape.out_dim * shape.in_dim,
        entropy=[entanglement_entropy(s[: bonds[k + 1]]) for k, s in enumerate(factorized.spectra)],
        tied_keys=list(tied_keys),
    )


def record_cores(rec: MPORecord, tensors: Mapping[str, Tensor]) -> list[Tensor]:
    """The cores of `rec`'s module from `tensors` (a reader or a dict); refuse cores holding
    NaN or infinite values."""
    cores = []
    for key in rec.core_keys():
        core = tensors[key]
        if not _finite(core):
            raise ArtifactError(
                f"MPO core {key} holds NaN or infinite values",
                hint="the artifact is damaged or diverged in training: use an earlier one",
            )
        cores.append(core)
    return cores


def _finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: NaN or +-inf anywhere shows in the min or max (one
    pass, no boolean copy: ~7x cheaper than `isfinite(...).all()` on Llama-sized cores)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def record_fixup(rec: MPORecord, tensors: Mapping[str, Tensor]) -> Fixup | None:
    """The rounding fixup of `rec`'s module from `tensors` (a reader or a dict), None if it
    has none; refuse one whose tensors are not what the record says. Whether it still holds
    for the cores is the caller's check (`Fixup.matches`)."""
    if rec.fixup is None:
        return None
    index_key, value_key = rec.fixup_keys()
    index, value = tensors[index_key], tensors[value_key]
    size = rec.out_dim * rec.in_dim
    problem = None
    if index.dtype != torch.int64 or value.dtype != getattr(torch, rec.dtype):
        problem = f"holds {index.dtype} indices and {value.dtype} values"
    elif index.numel() and not (int(index.min()) >= 0 and int(index.max()) < size):
        problem = f"has indices outside the {rec.out_dim}x{rec.in_dim} matrix"
    if problem is not None:
        raise ArtifactError(
            f"the rounding fixup of {rec.name} {problem} "
            f"(expected int64 indices and {rec.dtype} values)",
            hint="the artifact is damaged: restore it, or re-create it with the stage that made it",
        )
    return Fixup(index, value, rec.fixup.cores_sha256)


def record_spectra(
    rec: MPORecord, tensors: Mapping[str, Tensor], cores: Sequence[Tensor]
) -> list[Tensor] | None:
    """The bond spectra recorded for `rec`'s module (n-1 float64 tensors, descending), if it
    has them and they hold for `cores` (their fingerprint is the recorded one); else None.
    Refuse recorded spectra whose tensor is not what the record says."""
    if rec.spectra is None or cores_fingerprint(cores) != rec.spectra.cores_sha256:
        return None
    (key,) = rec.spectra_keys()
    flat = tensors[key]
    lengths = rec.bonds[1:-1]  # full spectra: nothing was cut
    if flat.dtype != torch.float64 or flat.shape != (sum(lengths),):
        raise ArtifactError(
            f"the recorded spectra of {rec.name} hold {flat.dtype} values of shape "
            f"{tuple(flat.shape)} (expected float64, ({sum(lengths)},))",
            hint="the artifact is damaged: restore it, or re-create it with the stage that made it",
        )
    return list(flat.split(lengths))


def dense_weight(rec: MPORecord, cores: Sequence[Tensor]) -> Tensor:
    """The weight the cores represent, oriented as the original checkpoint stored it;
    contracted and returned in float64 for float64 cores, float32 otherwise."""
    work = torch.float64 if cores[0].dtype == torch.float64 else torch.float32
    matrix = to_matrix([c.to(work) for c in cores], rec.mpo_shape)
    return as_weight(matrix, rec.kind)


def module_state(rec: MPORecord, tensors: Mapping[str, Tensor]) -> MPOModuleState:
    """What `install_mpo_layers` needs to rebuild `rec`'s module (and the modules tied to it)."""
    tied = tuple(key.removesuffix(".weight") for key in rec.tied_keys)
    cores = record_cores(rec, tensors)
    fixup = record_fixup(rec, tensors)
    return MPOModuleState(rec.name, rec.kind, rec.mpo_shape, cores, tied_names=tied, fixup=fixup)


# -- MPO layers of a live model ----------------------------------------------------------------


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


def _tied_to(model: nn.Module, name: str, weight: nn.Parameter) -> list[str]:
    """Live names of the other modules holding the very same weight Parameter."""
    return [
        other
        for other, module in model.named_modules(remove_duplicate=False)
        if other != name and getattr(module, "weight", None) is weight
    ]


def decompose_in_place(
    model: nn.Module, names: Iterable[str], num_cores: int = 5
) -> dict[str, MPORecord]:
    """Replace the dense modules `names` (live names) by lossless MPO layers, in place; return
    their records (live names, errors of the decomposition).

    Each weight is factorized as stored now (trained or not) with balanced automatic modes
    (`plan_shape`); the MPO layer keeps the module's bias Parameter itself (same object, so an
    optimizer's state for it carries over). Tied modules get layers sharing the same cores.
    """
    done: dict[str, MPORecord] = {}
    for name in names:
        module = model.get_submodule(name)
        kind = module_kind(module)
        weight = module.weight
        out_dim, in_dim = as_matrix(weight, kind).shape
        shape = plan_shape(int(out_dim), int(in_dim), num_cores)
        factorized = factorize_weight(weight.detach(), kind, shape)
        tied = _tied_to(model, name, weight)
        old = {n: model.get_submodule(n) for n in [name, *tied]}
        state = MPOModuleState(name, kind, shape, factorized.cores, tied_names=tied)
        installed = install_mpo_layers(model, [state])
        for live, layer in installed.items():
            bias = getattr(old[live], "bias", None)
            if isinstance(bias, nn.Parameter) and isinstance(layer.bias, nn.Parameter):
                layer.bias = bias
        done[name] = mpo_record(
            name=name,
            kind=kind,
            weight_shape=tuple(weight.shape),
            dtype=weight.dtype,
            shape=shape,
            factorized=factorized,
            tied_keys=[f"{t}.weight" for t in tied],
        )
    return done


@dataclass
class MPOStructure:
    """The shape and tied names of one MPO of a live model: what `install_cores` needs to
    rebuild it (checkpoints of runs whose dynamic rounds decomposed matrices)."""

    shape: MPOShape
    tied: list[str] = field(default_factory=list)
    bonds: list[int] | None = None  # None: those of the cores it is installed with

    def to_dict(self) -> dict[str, Any]:
        return {**self.shape.to_dict(), "tied": self.tied, "bonds": self.bonds}

    @classmethod
    def from_dict(cls, info: Mapping[str, Any]) -> MPOStructure:
        shape = MPOShape(
            info["out_dim"], info["in_dim"], tuple(info["out_modes"]), tuple(info["in_modes"])
        )
        return cls(shape, list(info.get("tied", [])), info.get("bonds"))


def mpo_structure(model: nn.Module) -> dict[str, MPOStructure]:
    """Every MPO of the live model (live names) with its shape and tied names."""
    structure: dict[str, MPOStructure] = {}
    for name, cores in mpo_cores(model).items():
        tied = [
            other
            for other, m in model.named_modules(remove_duplicate=False)
            if other != name and getattr(m, "mpo", None) is cores
        ]
        structure[name] = MPOStructure(cores.shape, tied, list(bonds_of(list(cores.core))))
    return structure


def install_cores(
    model: nn.Module, structure: Mapping[str, MPOStructure], tensors: Mapping[str, Tensor]
) -> list[str]:
    """Install the MPO layers of `structure` with cores `tensors[core_key(name, k)]` for the
    names that are not MPO layers yet; return those names."""
    present = set(mpo_cores(model))
    states = [
        MPOModuleState(
            name,
            module_kind(model.get_submodule(name)),
            s.shape,
            [tensors[core_key(name, k)] for k in range(s.shape.num_cores)],
            tied_names=s.tied,
        )
        for name, s in structure.items()
        if name not in present
    ]
    install_mpo_layers(model, states)
    for name, s in structure.items():  # a squeeze cut them: cores of the recorded bonds
        if name in present and s.bonds is not None:
            _resize_cores(mpo_cores(model)[name], s.bonds)
    return [s.name for s in states]


def _resize_cores(cores: MPOCores, bonds: Sequence[int]) -> None:
    """Give `cores` zero parameters of `bonds` where their shapes differ (values to be
    loaded next), each trainable as the one it replaces."""
    for k, core in enumerate(cores.core):
        shape = (bonds[k], core.shape[1], core.shape[2], bonds[k + 1])
        if tuple(core.shape) != shape:
            cores.core[k] = nn.Parameter(core.new_zeros(shape), requires_grad=core.requires_grad)
    cores._kept = None


def trained_records(model: nn.Module, records: Mapping[str, MPORecord]) -> dict[str, MPORecord]:
    """Records of the model's MPOs after training (live names): trained core indices, bonds
    and sizes of the cores as they are now, live tied keys. No reconstruction error and no
    bond entropy: both described the decomposition, not the trained cores (merge reproduces
    the trained weights from the cores exactly; `inspect --plot` draws their spectra), and no
    rounding fixup or recorded spectra (they held for the decomposed cores; the trained model
    saves neither)."""
    structure = mpo_structure(model)
    final: dict[str, MPORecord] = {}
    for name, cores in mpo_cores(model).items():
        tensors = [c.detach().cpu() for c in cores.core]
        final[name] = records[name].model_copy(
            update={
                "trainable": [k for k, c in enumerate(cores.core) if c.requires_grad],
                "bonds": list(bonds_of(tensors)),
                "params": num_params(tensors),
                "entropy": [],
                "rel_error": None,
                "predicted_error": None,
                "fixup": None,
                "spectra": None,
                "tied_keys": [f"{t}.weight" for t in structure[name].tied],
            }
        )
    return final
