"""`mpoe`: train an MPO mixture of experts; load it; refuse a dense merge (`merge` exports
Mixtral or Switch Transformers checkpoints where `transformers` has the class).

The gradient mask (the paper's, absent from its released code): each optimizer step, the shared
central core's gradient is dropped (set to None, so AdamW neither moves it nor decays it)
with probability `grad_mask_p`, drawn from a generator seeded by (seed, step): a resumed run
draws what a straight run draws. p = 0 updates it every step, p = 1 freezes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mposurgeon.errors import UsageError
from mposurgeon.methods.base import Method, TrainingSource, train_only
from mposurgeon.methods.mpoe.config import MPOEConfig
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.methods.mpoe.state import install_experts, routers_of
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.moe import MoELinear


class MPOEMethod(Method):
    config_class: ClassVar[type[MPOEConfig]] = MPOEConfig
    config: MPOEConfig

    # -- training ----------------------------------------------------------------------------

    def check_source(self, source: TrainingSource) -> None:
        super().check_source(source)
        if not any(isinstance(r, MPOERecord) for r in source.records.values()):
            raise UsageError(
                f"{source.path} has no mixture of experts to train with --method mpoe",
                hint=f"upcycle it first: mposurgeon moe {source.path} --experts 4",
            )

    def set_trainable(self, model: nn.Module) -> None:
        """Everything trains (the paper fine-tunes the whole model): routers, every expert's
        cores, the shared central core (under the gradient mask), the other weights."""
        train_only(model, lambda name: True)

    def training_loss(self, model: nn.Module) -> Tensor | None:
        """`balance_coef` times the mean over the routers' calls since the last call of the
        Switch load-balancing loss (1 for uniform routing); None without routers."""
        losses = [loss for r in routers_of(model).values() for loss in r.balance_losses]
        for router in routers_of(model).values():
            router.balance_losses.clear()
        if not losses or self.config.balance_coef == 0:
            return None
        return self.config.balance_coef * torch.stack(losses).mean()

    def before_optimizer_step(self, model: nn.Module, step: int, seed: int) -> None:
        """The gradient mask (module doc): drop the central cores' gradients with
        probability `grad_mask_p`, one draw per step for all of them."""
        p = self.config.grad_mask_p
        if p == 0:
            return
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if p == 1 or float(torch.rand((), generator=generator)) < p:
            for module in model.modules():
                if isinstance(module, MoELinear):
                    module.mpoe.central.grad = None

    def training_metrics(self, model: nn.Module) -> dict[str, Any]:
        """`expert_load`: per router (live block name), the fraction of training token slots
        each expert was chosen for."""
        load: dict[str, list[float]] = {}
        for name, router in routers_of(model).items():
            total = float(router.load.sum())
            if total:
                load[name.removesuffix(".mpoe_router")] = [
                    round(float(v) / total, 4) for v in router.load
                ]
        return {"expert_load": load} if load else {}

    # -- the module state it owns ------------------------------------------------------------

    def no_dense_form(self, record: ModuleRecord) -> UsageError:
        return UsageError(
            f"{record.name}: a mixture of experts has no single dense weight, and this "
            "architecture has no mixture-of-experts class in transformers to merge into",
            hint="run the artifact with `mposurgeon.load_model(ARTIFACT)` (Llama-family models "
            "merge to Mixtral, T5 to Switch Transformers)",
        )

    def install(
        self,
        model: nn.Module,
        records: Sequence[ModuleRecord],
        tensors: Mapping[str, Tensor],
        forward_mode: ForwardMode = "auto",
    ) -> None:
        install_experts(model, [r for r in records if isinstance(r, MPOERecord)], tensors)
