"""Which weight matrices matter: Fisher importance scores and top-N choice per weight pattern.

Fisher scores follow ChildTuning-D as OPF uses them: one pass over (a sample of) labelled
batches, forward + backward, no optimizer step. After each backward the gradients of ALL
parameters are clipped together (`clip_grad_norm_`, as a training step would); the research
code clips each matrix alone, which rescales every matrix to the same norm and flattens the
ranking. A matrix's score is `mean(grad^2)` over its elements, averaged over the batches
(ChildTuning's 1/N), so scores do not grow with the number of batches.

Choices are made per weight pattern: FFN_1, FFN_2 and each attention projection (q, k, v, o,
fused qkv) separately, so "top 2 of FFN_1 and attention" is 2 x 5 matrices on BERT. Gated
FFNs (Llama `gate_proj`/`up_proj`, T5 `wi_0`/`wi_1`) have two FFN_1 matrices per layer; each is
a pattern of its own (`FFN_1.gate`, `FFN_1.up`), so N is always a number of layers.

This module knows `torch.nn` and the weight-group tables, not files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import Tensor, nn

from mposurgeon.errors import MposurgeonError
from mposurgeon.models.groups import attention_projection
from mposurgeon.models.layers import MPOLinear

#: Pattern order used when listing choices (others follow alphabetically).
PATTERN_ORDER: tuple[str, ...] = (
    "FFN_1",
    "FFN_1.gate",
    "FFN_1.up",
    "FFN_2",
    "attention.q",
    "attention.k",
    "attention.v",
    "attention.qkv",
    "attention.o",
)

_GATE = re.compile(r"(?:^|\.)(?:gate_proj|wi_0)$")
_UP = re.compile(r"(?:^|\.)(?:up_proj|wi_1)$")


def weight_pattern(model_type: str, group: str | None, name: str) -> str | None:
    """The pattern of module `name` of group `group`: "FFN_1" (or "FFN_1.gate"/"FFN_1.up" for a
    gated FFN), "FFN_2", "attention.q"/".k"/".v"/".o"/".qkv"; None for any other group.

    `name` is a module name relative to the base model, or with one `base_model_prefix.`.
    """
    name = name.removesuffix(".weight")
    if group == "FFN_1":
        if _GATE.search(name):
            return "FFN_1.gate"
        if _UP.search(name):
            return "FFN_1.up"
        return "FFN_1"
    if group == "FFN_2":
        return "FFN_2"
    if group == "attention":
        projection = attention_projection(model_type, name)
        return f"attention.{projection}" if projection else None
    return None


def pattern_sort_key(pattern: str) -> tuple[int, str]:
    """Sort key listing patterns in PATTERN_ORDER, unknown ones after, alphabetically."""
    return (
        PATTERN_ORDER.index(pattern) if pattern in PATTERN_ORDER else len(PATTERN_ORDER),
        pattern,
    )


def choose_top_n(
    scores: dict[str, float],
    pattern_of: Callable[[str], str | None] | dict[str, str],
    top_n: int,
    exclude: Collection[str] = (),
) -> list[str]:
    """Per weight pattern, the `top_n` highest-scoring names not in `exclude`.

    Names whose pattern is None (or absent from a dict) are never chosen. Ties go to the name
    that sorts first. A pattern with fewer candidates gives all of them. The result lists
    patterns in PATTERN_ORDER, each ranked best first.
    """
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    lookup = pattern_of.get if isinstance(pattern_of, dict) else pattern_of
    excluded = set(exclude)
    by_pattern: dict[str, list[str]] = {}
    for name in scores:
        pattern = lookup(name)
        if pattern is not None and name not in excluded:
            by_pattern.setdefault(pattern, []).append(name)
    chosen: list[str] = []
    for pattern in sorted(by_pattern, key=pattern_sort_key):
        ranked = sorted(by_pattern[pattern], key=lambda n: (-scores[n], n))
        chosen.extend(ranked[:top_n])
    return chosen


def fisher_scores(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    names: Sequence[str],
    *,
    max_batches: int | None = None,
    max_grad_norm: float | None = 1.0,
) -> dict[str, float]:
    """Fisher importance of the weight matrices of the live modules `names` in `model`.

    Each batch (tensors of shape (batch, seq), with `labels`) runs forward and backward in
    eval mode (no dropout, so scores are reproducible); all parameters take gradients. The
    gradients are then clipped globally to `max_grad_norm` (None: no clipping) and each
    matrix adds `mean(grad^2)`; the score is that sum divided by the number of batches. The
    optimizer is never stepped; train/eval modes, `requires_grad` flags and existing `.grad`
    tensors are restored afterwards.

    Modules: anything with a `weight` Parameter (nn.Linear, GPT-2 Conv1D, nn.Embedding) uses
    its gradient; an `MPOLinear` is scored on the gradient of its dense reconstructed weight
    W (out, in), captured by hooks as `grad_out^T @ input` and scaled by the same clip factor,
    so dense and MPO matrices compare. Returns {name: score} in the order of `names`.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if not isinstance(module, MPOLinear) and not isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight to score")
    params = [p for p in model.parameters() if p.is_floating_point()]
    modes = {m: m.training for m in model.modules()}
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    totals = dict.fromkeys(names, 0.0)
    mpo_grads: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(_dense_grad_hook(name, mpo_grads))
        for name, module in modules.items()
        if isinstance(module, MPOLinear)
    ]
    device = params[0].device if params else torch.device("cpu")
    seen = 0
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            mpo_grads.clear()
            inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            loss = model(**inputs).loss
            if loss is None:
                raise ValueError("the model returned no loss: batches need `labels`")
            loss.backward()
            scale = _clip(params, max_grad_norm, seen)
            for name, module in modules.items():
                if isinstance(module, MPOLinear):
                    grad = mpo_grads.get(name)
                    grad = None if grad is None else grad * scale
                else:
                    grad = module.weight.grad
                if grad is not None:
                    totals[name] += float(grad.double().square().mean())
            model.zero_grad(set_to_none=True)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ValueError("no batches to score")
    return {name: total / seen for name, total in totals.items()}


def _clip(params: Sequence[nn.Parameter], max_norm: float | None, batch: int) -> float:
    """Clip all gradients together in place; return the factor applied (1.0 if none)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        raise ValueError("the loss depends on no parameter")
    norm = float(
        torch.nn.utils.clip_grad_norm_(with_grad, math.inf if max_norm is None else max_norm)
    )
    if not math.isfinite(norm):
        raise MposurgeonError(
            f"non-finite gradient norm in batch {batch + 1} while scoring",
            hint="check the data and the model's dtype (float16 overflows)",
        )
    if max_norm is None:
        return 1.0
    # clip_grad_norm_ multiplies by max_norm / (norm + 1e-6), capped at 1.
    return min(1.0, max_norm / (norm + 1e-6))


def _dense_grad_hook(
    name: str, store: dict[str, Tensor]
) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
    """A forward hook that adds dL/dW = grad_out^T @ input (out, in) of this call to store."""

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not output.requires_grad:
            return
        x = args[0].detach()

        def on_grad(grad_out: Tensor) -> None:
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
            dense = g.mT @ x.reshape(-1, x.shape[-1])
            store[name] = store[name] + dense if name in store else dense

        output.register_hook(on_grad)

    return hook
