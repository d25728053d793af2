"""MPOE state: upcycling a factorized matrix to experts (tensors, by file name), and building
the live layers from a record and its tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.models.moe import ROUTER, MoELinear, MPOExperts, Router
from mposurgeon.models.orientation import as_weight
from mposurgeon.models.surgery import replace_module, resolve_module_name


def expert_tensors(
    record: MPOERecord, cores: Sequence[Tensor], scale: float = 1.0
) -> dict[str, Tensor]:
    """The MPOE tensors of `record`'s matrix from its MPO `cores`: the central core once and
    E copies of the auxiliary cores (each expert's first auxiliary core times `scale`: the
    `out` matrices of switch gates start at E times the dense matrix)."""
    c = record.central_index
    out = {record.central_key(): cores[c].clone()}
    first = next(k for k in range(len(cores)) if k != c)
    for e in range(record.experts):
        for k, core in enumerate(cores):
            if k != c:
                out[record.expert_key(e, k)] = core * scale if k == first else core.clone()
    return out


def router_weight(
    experts: int, d_model: int, *, gate: str, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """A new router's weight (E, d_model): normal with std 0.02 (normalized gates), zeros
    (switch gates: p = 1/E, which the `out` experts' scale E undoes)."""
    if gate == "switch":
        return torch.zeros(experts, d_model, dtype=dtype)
    return (torch.randn(experts, d_model, generator=generator) * 0.02).to(dtype)


def expert_cores(record: MPOERecord, tensors: Mapping[str, Tensor], expert: int) -> list[Tensor]:
    """Expert `expert`'s cores from `tensors` (file names), the central core in its place."""
    return [
        tensors[record.central_key()]
        if k == record.central_index
        else tensors[record.expert_key(expert, k)]
        for k in range(len(record.bonds) - 1)
    ]


def expert_weight(record: MPOERecord, tensors: Mapping[str, Tensor], expert: int) -> Tensor:
    """Expert `expert`'s dense weight as the original checkpoint stored it, float32 (float64
    for float64 cores)."""
    from mposurgeon.mpo.contract import to_matrix

    cores = expert_cores(record, tensors, expert)
    work = torch.float64 if cores[0].dtype == torch.float64 else torch.float32
    return as_weight(to_matrix([c.to(work) for c in cores], record.mpo_shape), record.kind)


def install_experts(
    model: nn.Module, records: Sequence[MPOERecord], tensors: Mapping[str, Tensor]
) -> None:
    """Replace each recorded matrix of `model` (records under file names) by an `MoELinear`,
    with one `Router` per block put in the block's module as `mpoe_router`."""
    routers: dict[str, Router] = {}
    owners = [r for r in records if r.owns_router]
    for rec in owners:
        block = resolve_module_name(model, rec.router.rpartition(".")[0])
        weight = tensors[f"{rec.router}.weight"]
        router = Router(
            weight.clone(),
            top_k=rec.top_k,
            gate=rec.gate,
            capacity_factor=rec.capacity_factor,
            jitter=rec.router_jitter,
        )
        model.get_submodule(block).add_module(ROUTER, router)
        routers[rec.router] = router
    for rec in records:
        if rec.router not in routers:
            raise KeyError(f"{rec.name}: no record owns its router {rec.router}")
        live = resolve_module_name(model, rec.name)
        old = model.get_submodule(live)
        c = rec.central_index
        auxiliary = [
            [tensors[rec.expert_key(e, k)].clone() for k in range(len(rec.bonds) - 1) if k != c]
            for e in range(rec.experts)
        ]
        experts = MPOExperts(rec.mpo_shape, tensors[rec.central_key()].clone(), auxiliary)
        bias = getattr(old, "bias", None)
        bias = bias.detach().clone() if isinstance(bias, Tensor) else None
        replace_module(model, live, MoELinear(experts, routers[rec.router], rec.role, bias))


def routers_of(model: nn.Module) -> dict[str, Router]:
    """The live model's routers by live module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Router)}
