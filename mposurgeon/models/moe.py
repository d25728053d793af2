"""MPO mixtures of experts (MPOE): feed-forward matrices whose experts share one central core.

Each targeted matrix becomes an `MoELinear`: E experts whose MPOs share the central core (one
`nn.Parameter`, `mpoe.central`) and own their auxiliary cores (`mpoe.experts.<e>.<k>`, k the
core's position), plus the matrix's bias, shared. A `Router` per feed-forward block (a child
`mpoe_router` of the block's module, weight (E, d_model), no bias) picks, per token, its top-k
experts from p = softmax(x W_r^T); every matrix of the block follows the same choice, so a token
goes through one expert's whole FFN.

Shapes: an `in` matrix (FFN_1: BERT `intermediate.dense`, Llama `gate_proj` and `up_proj`)
takes (..., d_model) and returns (..., k, d_ff), one row per chosen expert; an `out` matrix
(FFN_2) takes (..., k, d_ff) and returns the gated sum over the k rows, (..., d_model). The
activation between them (and Llama's gate * up) works row by row, so the model's own FFN code
runs unchanged.

Gates (`Routing.gates`), per token over its k chosen experts:
- `normalized` (Mixtral's): p_e / sum of the chosen p, the sum taken without gradient, so the
  gates sum to one (the output at upcycling is the dense FFN's: the experts start identical)
  and the router still gets a gradient (with top-1 the gate is p / stop-gradient(p) = 1);
- `switch` (Switch Transformers', top-1): the gate is p itself; upcycling starts the router at
  zero (p = 1/E) and the `out` experts at E times the dense matrix, so the output is again the
  dense FFN's.

Training only: `jitter` multiplies the router's input by U(1 - jitter, 1 + jitter) (Switch);
`capacity_factor` c > 0 lets each expert take at most ceil(c * tokens * k / E) token slots of
a call, in token order, the rest dropped (gate 0: the residual carries them). Evaluation routes
every token (as Mixtral does, and as `merge`'s Mixtral and Switch checkpoints do).

The Switch load-balancing loss of a call, E * sum_e f_e * P_e (f_e: the fraction of chosen slots
that went to e before any drop, P_e: the mean router probability of e), is 1 for uniform
routing; each training call appends it to `Router.balance_losses`, and adds its slot counts to
`Router.load` (the experts' load). Padding tokens count like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mposurgeon.mpo.contract import to_matrix
from mposurgeon.mpo.shapes import MPOShape

Role = Literal["in", "out"]
Gate = Literal["normalized", "switch"]
#: The child module name of a feed-forward block's router.
ROUTER = "mpoe_router"


@dataclass
class Routing:
    """One routing of T tokens: `experts` (T, k) long, the chosen experts, -1 where a slot
    was dropped (capacity); `gates` (T, k) the chosen experts' weights (0 where dropped)."""

    experts: Tensor
    gates: Tensor


class Router(nn.Module):
    """Top-k routing of tokens to E experts (see the module doc for gates, jitter, capacity).

    `weight` (E, d_model). The last routing is kept for the block's other matrices: `route(x)`
    with the very tensor it routed last returns the same routing.
    """

    def __init__(
        self,
        weight: Tensor,
        *,
        top_k: int = 1,
        gate: Gate = "normalized",
        capacity_factor: float = 1.0,
        jitter: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= weight.shape[0]:
            raise ValueError(f"top_k {top_k} is not between 1 and {weight.shape[0]} experts")
        if gate == "switch" and top_k != 1:
            raise ValueError("switch gates route each token to one expert (top_k 1)")
        self.weight = nn.Parameter(weight)
        self.top_k = top_k
        self.gate = gate
        self.capacity_factor = capacity_factor
        self.jitter = jitter
        self.register_buffer("load", torch.zeros(weight.shape[0], dtype=torch.float64), False)
        self.balance_losses: list[Tensor] = []
        self._last: tuple[Tensor, Routing] | None = None

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    def route(self, x: Tensor) -> Routing:
        """The routing of the tokens of `x` (..., d_model), T = x.numel() / d_model."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        tokens = x.reshape(-1, x.shape[-1])
        if self.training and self.jitter > 0:
            noise = torch.empty_like(tokens).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            tokens = tokens * noise
        logits = F.linear(tokens.float(), self.weight.float())  # float32, as Switch routes
        probs = logits.softmax(dim=-1)
        top, experts = probs.topk(self.top_k, dim=-1)
        normalized = self.gate == "normalized"
        gates = top / top.sum(dim=-1, keepdim=True).detach() if normalized else top
        if self.training:
            self._account(probs, experts)
            experts = self._drop_overflow(experts)
            gates = gates.masked_fill(experts < 0, 0.0)
        routing = Routing(experts, gates.to(x.dtype))
        self._last = (x, routing)
        return routing

    def last(self) -> Routing:
        """The routing of the last `route` call (for an `out` matrix)."""
        if self._last is None:
            raise RuntimeError("an MPOE out matrix ran before its block's in matrix")
        return self._last[1]

    def _account(self, probs: Tensor, experts: Tensor) -> None:
        """The call's balance loss and load (see the module doc)."""
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        fraction = counts.to(probs.dtype) / experts.numel()
        self.balance_losses.append(self.num_experts * (fraction * probs.mean(dim=0)).sum())
        self.load += counts.detach().to(self.load.device, torch.float64)

    def _drop_overflow(self, experts: Tensor) -> Tensor:
        """`experts` with the slots beyond each expert's capacity set to -1."""
        if self.capacity_factor <= 0:
            return experts
        flat = experts.reshape(-1)
        capacity = math.ceil(self.capacity_factor * flat.numel() / self.num_experts)
        onehot = F.one_hot(flat, self.num_experts)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1)  # 1-based rank within its expert
        return flat.masked_fill(position > capacity, -1).view_as(experts)


class MPOExperts(nn.Module):
    """E MPOs of one (out_dim, in_dim) matrix that share their central core.

    `central` (r, I_c, J_c, r'); `experts[e][str(k)]` the auxiliary core k of expert e.
    """

    def __init__(self, shape: MPOShape, central: Tensor, auxiliary: Sequence[Sequence[Tensor]]):
        super().__init__()
        self.shape = shape
        c = shape.central_index
        if shape.num_cores < 2:
            raise ValueError("an MPO of one core has no auxiliary cores for experts to own")
        self.central = nn.Parameter(central)
        self.experts = nn.ModuleList()
        for cores in auxiliary:
            positions = [k for k in range(shape.num_cores) if k != c]
            if len(cores) != len(positions):
                raise ValueError(f"{len(cores)} auxiliary cores for {len(positions)} positions")
            self.experts.append(
                nn.ParameterDict(
                    {str(k): nn.Parameter(t) for k, t in zip(positions, cores, strict=True)}
                )
            )

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def cores(self, expert: int) -> list[Tensor]:
        """Expert `expert`'s cores, the shared central core in its place."""
        own = self.experts[expert]
        c = self.shape.central_index
        return [self.central if k == c else own[str(k)] for k in range(self.shape.num_cores)]

    def matrix(self, expert: int) -> Tensor:
        """Expert `expert`'s dense (out_dim, in_dim) matrix."""
        return to_matrix(self.cores(expert), self.shape)


class MoELinear(nn.Module):
    """A Linear (or Conv1D) of a feed-forward block as an MPO mixture of experts (`role`: see
    the module doc). `bias` (out_dim,) is shared by the experts. The router is the block's
    (registered there, held here by reference)."""

    def __init__(
        self, mpoe: MPOExperts, router: Router, role: Role, bias: Tensor | None = None
    ) -> None:
        super().__init__()
        self.mpoe = mpoe
        self.role: Role = role
        self.in_features = mpoe.shape.in_dim
        self.out_features = mpoe.shape.out_dim
        self.bias = nn.Parameter(bias) if bias is not None else None
        self._router = (router,)  # a tuple: not a second registration of the router

    @property
    def router(self) -> Router:
        return self._router[0]

    @property
    def weight(self) -> Tensor:
        """The shared central core: for model code that reads `layer.weight.dtype` (T5);
        it is not a dense weight, and forward never uses it."""
        return self.mpoe.central

    def forward(self, x: Tensor) -> Tensor:
        k = self.router.top_k
        if self.role == "in":
            routing = self.router.route(x)
            lead = x.shape[:-1]
            rows = (
                x.reshape(-1, 1, self.in_features).expand(-1, k, -1).reshape(-1, self.in_features)
            )
        else:
            routing = self.router.last()
            lead = x.shape[:-2]
            rows = x.reshape(-1, self.in_features)
        experts = routing.experts.reshape(-1)
        if experts.numel() != rows.shape[0]:
            raise RuntimeError(
                f"MPOE {self.role} matrix got {rows.shape[0]} rows for {experts.numel()} routed"
            )
        out = rows.new_zeros(rows.shape[0], self.out_features)
        for e in torch.unique(experts).tolist():
            if e < 0:
                continue
            where = (experts == e).nonzero(as_tuple=True)[0]
            out = out.index_put((where,), F.linear(rows[where], self.mpoe.matrix(e)))
        if self.bias is not None:
            out = out + self.bias
        if self.role == "in":
            return out.view(*lead, k, self.out_features)
        gated = out.view(-1, k, self.out_features) * routing.gates.unsqueeze(-1)
        return gated.sum(dim=1).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        s = self.mpoe.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"experts={self.mpoe.num_experts}, role={self.role}, "
            f"modes={list(s.out_modes)}x{list(s.in_modes)}, bias={self.bias is not None}"
        )
