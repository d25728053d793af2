"""Dimension squeezing during training (MPOP): cut the MPO bonds a step at a time, fine-tuning
in between, so the model recovers from each cut before the next.

The schedule: K cuts at optimizer steps round(T * u * i / K), i = 1..K, of a run of T steps,
u (`until`, `--squeeze-until`) the fraction of the run by which the last cut is made: the first
comes after a warm-up of T * u / K steps, and the last leaves T * (1 - u) steps to recover.

The final bonds are planned once, at the first cut: `truncate`'s global allocation
(`mpo.allocation.allocate`) over every MPO module of the model, on the spectra of the cores as
training left them, to `ratio` of the MPO parameters the run started with (`--squeeze-to`, as
`truncate --param-ratio`) or to error bounds `rel_tol` (`--squeeze-rel-tol`, as `truncate
--rel-tol`). Cut i lowers every bond geometrically from its size at the plan towards its planned
size, r_i = round(r_0 * (r_K / r_0) ** (i / K)), so cut K reaches the plan exactly and the
final bonds are known (and reported) from the first cut on. (Allocating anew at each cut, to
`ratio ** (i / K)`, made the result depend on the path: the mild first targets chose the cuts
and the last could not undo them. On MiniLM at R 0.5 it scored the same within seed noise,
0.804 against 0.798 planned: benchmarks/bench_squeeze.py.)

A cut reads each module's current cores (training moved them out of canonical form) and
replaces each changed module's cores by a TT-SVD of the matrix they represent, cut to the
bonds (`mpo.decomposition.recompress`, as `truncate` cuts): new parameters, so the training
loop rebuilds its optimizer and the cut cores start with fresh AdamW moments (their old
moments were kept in a gauge the new cores do not share, so no cut of them is consistent);
the other parameters keep theirs, the learning-rate schedule continues. Measured against the
nearest thing to carrying them (step count kept, first moment 0, second moment the old core's
mean, so the first steps after a cut are not full-size sign steps): 0.795 against 0.798 reset
(MiniLM, man-sections, R 0.5, seed 0), so the reset stays. With one cut and no training
before it, a squeeze gives what `truncate` gives on the same cores (the same cut; the plan
from the same spectra, computed here, recorded by decompose there).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mposurgeon.methods.mpo.state import mpo_cores
from mposurgeon.models.layers import MPOCores
from mposurgeon.mpo.allocation import BondProblem, allocate, min_params
from mposurgeon.mpo.decomposition import gram_spectra, recompress
from mposurgeon.mpo.metrics import num_params
from mposurgeon.mpo.shapes import bonds_of

#: The fraction of the run by which the last cut is made, by default. Measured on man-sections
#: (benchmarks/bench_squeeze.py, R 0.5, seed 0, bonds then allocated anew at each cut): 0.804 at
#: 0.75, 0.815 at 0.5 and at 0.25, a difference of 4 of 341 rows, within seed noise (seeds 0-2
#: at 0.75 span 0.798-0.839), so the first placement stays.
SQUEEZE_UNTIL = 0.75


@dataclass(frozen=True)
class SqueezeSchedule:
    """K cuts over the first `until` of a run of `total_steps` optimizer steps, to `ratio` of
    the starting MPO parameters or to error bounds `rel_tol` (exactly one of the two)."""

    total_steps: int
    cuts: int
    ratio: float | None = None
    rel_tol: float | None = None
    until: float = SQUEEZE_UNTIL

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.rel_tol is None):
            raise ValueError("give ratio or rel_tol")
        if not 0 < self.until < 1:
            raise ValueError(f"until must lie in (0, 1), got {self.until}")
        steps = self.steps()
        if (
            self.cuts < 1
            or steps[0] < 1
            or len(set(steps)) < self.cuts
            or steps[-1] >= self.total_steps
        ):
            raise ValueError(
                f"{self.cuts} cuts by {self.until:g} of the run need more than "
                f"{self.total_steps} steps"
            )

    def steps(self) -> list[int]:
        """The optimizer steps after which the cuts happen (1-based counts of steps taken)."""
        span = self.total_steps * self.until
        return [round(span * i / self.cuts) for i in range(1, self.cuts + 1)]

    def bonds(self, i: int, start: Sequence[int], final: Sequence[int]) -> tuple[int, ...]:
        """Bonds of cut `i` (1..K) of a module planned from `start` to `final` bonds: each
        lowered geometrically, r_i = round(r_0 * (r_K / r_0) ** (i / K)), never below r_K."""
        t = i / self.cuts
        return tuple(
            max(f, round(s * (f / s) ** t)) if f < s else s
            for s, f in zip(start, final, strict=True)
        )


@dataclass(frozen=True)
class SqueezePlan:
    """Every MPO module's bonds when the plan was made (the first cut) and the final ones."""

    start: dict[str, tuple[int, ...]]
    final: dict[str, tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": {n: list(b) for n, b in self.start.items()},
            "final": {n: list(b) for n, b in self.final.items()},
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SqueezePlan:
        return cls(
            {n: tuple(b) for n, b in state["start"].items()},
            {n: tuple(b) for n, b in state["final"].items()},
        )


@dataclass
class Cut:
    """What one cut did: its step, the final target, MPO parameters before and after, the
    largest and mean predicted error bound of the changed modules, and the eval metrics
    around it."""

    step: int
    target: dict[str, float]
    params_before: int
    params_after: int
    modules_cut: int
    max_predicted_error: float
    mean_predicted_error: float
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reachable_ratio(model: nn.Module) -> float:
    """The smallest parameter ratio a squeeze of `model`'s MPOs can reach (every bond 1)."""
    cores = mpo_cores(model)
    before = sum(num_params(list(c.core)) for c in cores.values())
    floor = sum(min_params(_problem(c).sites) for c in cores.values())
    return floor / before if before else 1.0


@dataclass(frozen=True)
class Distillation:
    """Distillation from the model as it was just before the first cut (the teacher):
    loss = (1 - alpha) * task loss + alpha * T^2 * KL(teacher || student) on the logits
    softened by temperature T, averaged over the rows (classification) or the positions
    with a label (language modelling)."""

    alpha: float
    temperature: float = 2.0

    def loss(
        self, task_loss: Tensor, student: Tensor, teacher: Tensor, labels: Tensor | None
    ) -> Tensor:
        """The combined loss; logits (rows, classes) or (batch, positions, vocabulary)."""
        t = self.temperature
        log_student = F.log_softmax(student.float() / t, dim=-1)
        log_teacher = F.log_softmax(teacher.float() / t, dim=-1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
        if kl.dim() > 1 and labels is not None and labels.shape == kl.shape:
            keep = labels != -100
            kl = kl[keep] if bool(keep.any()) else kl.reshape(-1)
        return (1 - self.alpha) * task_loss + self.alpha * t * t * kl.mean()


@dataclass
class Squeezer:
    """The cuts of a `SqueezeSchedule` on a live model's MPOs: called after every optimizer
    step with the number of steps taken, it cuts when the schedule says and returns whether
    parameters changed. `evaluate` (optional) scores the model before and after each cut."""

    schedule: SqueezeSchedule
    evaluate: Callable[[], dict[str, float]] | None = None
    distillation: Distillation | None = None
    start_params: int | None = None  # MPO parameters when the run started
    cuts: list[Cut] = field(default_factory=list)
    plan: SqueezePlan | None = None  # made at the first cut
    teacher: nn.Module | None = None  # with `distillation`: the model before the first cut

    def __call__(self, step: int, model: nn.Module) -> bool:
        if self.start_params is None:
            self.start_params = _total_params(model)
        steps = self.schedule.steps()
        if len(self.cuts) >= len(steps) or step != steps[len(self.cuts)]:
            return False
        if self.distillation is not None and self.teacher is None:
            self.teacher = frozen_copy(model)
        if self.plan is None:
            self.plan = plan_bonds(model, self.schedule, self.start_params)
        before = self.evaluate() if self.evaluate is not None else None
        cut = cut_bonds(model, self.schedule, len(self.cuts) + 1, self.plan, step)
        if self.evaluate is not None:
            cut.eval_before, cut.eval_after = before, self.evaluate()
        self.cuts.append(cut)
        return True

    def training_loss(self, task_loss: Tensor, logits: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """The loss to train on: the task's, or with a teacher the distillation loss."""
        if self.distillation is None or self.teacher is None:
            return task_loss
        with torch.no_grad():
            teacher = self.teacher(**inputs).logits
        labels = inputs.get("labels")
        return self.distillation.loss(task_loss, logits, teacher, labels)

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_params": self.start_params,
            "cuts": [c.to_dict() for c in self.cuts],
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_params = state["start_params"]
        self.cuts = [Cut(**c) for c in state["cuts"]]
        plan = state.get("plan")
        self.plan = SqueezePlan.from_dict(plan) if plan is not None else None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode that takes no gradients (a teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def plan_bonds(model: nn.Module, schedule: SqueezeSchedule, start_params: int) -> SqueezePlan:
    """The final bonds of every MPO of `model`: `truncate`'s global allocation on the cores'
    current spectra, to `schedule.ratio` of `start_params` MPO parameters or to error bounds
    `schedule.rel_tol`."""
    problems = {name: _problem(cores) for name, cores in mpo_cores(model).items()}
    names = [n for n, p in problems.items() if p.num_bonds > 0]
    target = round(schedule.ratio * start_params) if schedule.ratio is not None else None
    planned = allocate([problems[n] for n in names], target_params=target, rel_tol=schedule.rel_tol)
    return SqueezePlan(
        {n: problems[n].start() for n in names},
        {n: tuple(b) for n, b in zip(names, planned, strict=True)},
    )


def cut_bonds(
    model: nn.Module, schedule: SqueezeSchedule, i: int, plan: SqueezePlan, step: int = 0
) -> Cut:
    """Cut `i` (1..K) of `schedule` on every MPO of `model` that `plan` lowers, in place (new
    core parameters)."""
    held = mpo_cores(model)
    before = _total_params(model)
    errors = []
    for name, final in plan.final.items():
        cores = held[name]
        bonds = schedule.bonds(i, plan.start[name], final)
        if tuple(bonds) == bonds_of([c.detach() for c in cores.core]):
            continue  # not cut: left as it is, out of canonical form
        with torch.no_grad():
            cut, _ = recompress([c.detach() for c in cores.core], cores.shape, list(bonds[1:-1]))
        _replace_cores(cores, cut.cores)
        errors.append(cut.predicted_error)
    if schedule.ratio is not None:
        target = {"ratio": schedule.ratio}
    else:
        assert schedule.rel_tol is not None
        target = {"rel_tol": schedule.rel_tol}
    return Cut(
        step=step,
        target=target,
        params_before=before,
        params_after=_total_params(model),
        modules_cut=len(errors),
        max_predicted_error=max(errors, default=0.0),
        mean_predicted_error=sum(errors) / len(errors) if errors else 0.0,
    )


def _problem(cores: MPOCores) -> BondProblem:
    tensors = [c.detach() for c in cores.core]
    return BondProblem.from_cores(tensors, gram_spectra(tensors))


def _replace_cores(cores: MPOCores, new: list[torch.Tensor]) -> None:
    """New parameters for `cores`, each trainable as the one it replaces."""
    for k, tensor in enumerate(new):
        old = cores.core[k]
        param = nn.Parameter(tensor.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
        cores.core[k] = param
    cores._kept = None


def _total_params(model: nn.Module) -> int:
    return sum(num_params(list(c.core)) for c in mpo_cores(model).values())
