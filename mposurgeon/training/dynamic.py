"""OPF's dynamic selection: choose and decompose matrices by Fisher score during training.

`DynamicSelection` is an epoch hook of the training loop (ALGORITHMS.md section 3); the train
stage builds it with `dynamic_selection` from the flags (`DynamicPlan`) and the input's
`select` record, which may give round 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mposurgeon.artifact.manifest import SelectionRecord
from mposurgeon.errors import UsageError
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import decompose_in_place
from mposurgeon.methods.records import ModuleRecord
from mposurgeon.models.groups import MODEL_TYPE_ALIASES, group_of
from mposurgeon.models.surgery import resolve_module_name
from mposurgeon.training.tasks import model_inputs

#: Weight types that dynamic selection scores (the OPF paper's).
DYNAMIC_WEIGHT_TYPES = ("FFN_1", "FFN_2", "attention")
#: Batches of training data that one Fisher scoring round looks at.
FISHER_MAX_BATCHES = 64


def carried_selection(net: nn.Module, selection: SelectionRecord | None) -> SelectionRecord | None:
    """A `select` stage's selection with module names re-keyed to the live model's names
    (None for none, or an empty one)."""
    if selection is None or not selection.model_fields_set:
        return None

    def live(name: str) -> str:
        try:
            return resolve_module_name(net, name)
        except KeyError:
            return name

    given = selection.model_fields_set  # only what it records: its shape stays as it was
    update: dict[str, Any] = {}
    if "scores" in given:
        update["scores"] = {live(k): v for k, v in selection.scores.items()}
    if "patterns" in given:
        update["patterns"] = {live(k): v for k, v in selection.patterns.items()}
    if "chosen" in given:
        update["chosen"] = [live(n) for n in selection.chosen]
    return selection.model_copy(update=update)


class DynamicSelection:
    """OPF's dynamic selection (ALGORITHMS.md section 3), as an epoch hook of the loop.

    K = `split_num` rounds at epochs 0, ceil(E/K), 2 ceil(E/K), ...: score the dense matrices
    of the weight types with Fisher on the current model (training/importance.py), choose
    `top_n / K` more per weight pattern, skipping those already chosen (and those MPO in the
    input), and decompose them losslessly in place; the loop then rebuilds optimizer and
    scheduler so that the new cores train (the research code forgets this). Round 0 may be
    given (`round0`: a `select` artifact's choice); every process decomposes the main
    process's choice. The manifest's `selection` follows the `select` stage's schema, with all
    rounds filled in; `scores` holds each matrix's latest score.
    """

    def __init__(
        self,
        *,
        model_type: str,
        weight_types: list[str],
        top_n: int,
        split_num: int,
        epochs: int,
        rows: list[dict[str, Any]],
        collator: Any,
        batch_size: int,
        num_cores: int,
        already: list[str],
        round0: list[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
        self.weight_types = weight_types
        self.top_n = top_n
        self.split_num = split_num
        self.epochs = epochs
        self.interval = math.ceil(epochs / split_num)
        self.rows = rows
        self.collator = collator
        self.batch_size = batch_size
        self.num_cores = num_cores
        self.already = list(already)
        self.round0 = round0
        self.info = info or {}  # seed, data: recorded as they are
        self.rounds: list[dict[str, Any]] = []
        self.scores: dict[str, float] = {}
        self.patterns: dict[str, str] = {}
        self._records: dict[str, dict[str, Any]] = {}

    def schedule_warnings(self, epochs: int) -> list[str]:
        """A warning when fewer than K rounds fit in the epochs that will run."""
        rounds = len(range(0, epochs, self.interval))
        if rounds >= self.split_num:
            return []
        per_round = self.top_n // self.split_num
        return [
            f"only {rounds} of {self.split_num} selection rounds fit in {epochs} epochs "
            f"(one every {self.interval}): {rounds * per_round} of top-n {self.top_n} matrices "
            "per weight pattern will be decomposed"
        ]

    @property
    def chosen(self) -> list[str]:
        return [n for r in self.rounds for n in r["chosen"]]

    def _candidates(self, model: nn.Module) -> dict[str, str]:
        """Dense modules of the weight types (live name -> weight pattern)."""
        from mposurgeon.training.importance import weight_pattern

        found: dict[str, str] = {}
        for name, module in model.named_modules():
            if not isinstance(getattr(module, "weight", None), nn.Parameter):
                continue
            group = group_of(model, name)
            if group not in self.weight_types:
                continue
            pattern = weight_pattern(self.model_type, group, name)
            if pattern is not None:
                found[name] = pattern
        return found

    def __call__(self, epoch: int, model: nn.Module) -> bool:
        if epoch % self.interval or epoch // self.interval >= self.split_num:
            return False
        index = epoch // self.interval
        if index < len(self.rounds):
            return False  # ran before the checkpoint this run resumed from
        from accelerate.utils import broadcast_object_list

        from mposurgeon.training.importance import choose_top_n, fisher_scores

        candidates = self._candidates(model)
        skip = set(self.chosen) | set(self.already)
        names = [n for n in candidates if n not in skip]
        self.patterns.update({n: candidates[n] for n in names})
        if index == 0 and self.round0 is not None:
            new = list(self.round0)
        else:
            scores: dict[str, float] = {}
            if names:
                loader = DataLoader(
                    self.rows,  # type: ignore[arg-type]
                    batch_size=self.batch_size,
                    shuffle=False,
                    collate_fn=self.collator,
                    generator=torch.Generator(),  # leaves the global RNG (dropout) alone
                )
                batches = (model_inputs(model, b) for b in loader)
                scores = fisher_scores(model, batches, names, max_batches=FISHER_MAX_BATCHES)
            new = choose_top_n(scores, candidates, self.top_n // self.split_num, exclude=skip)
            shared = [(new, scores)]
            broadcast_object_list(shared)  # every process follows the main process's choice
            new, scores = shared[0]
            self.scores.update(scores)
        todo = [n for n in new if n in candidates]  # round0 names may be MPO already
        for name, record in decompose_in_place(model, todo, self.num_cores).items():
            self._records[name] = record.model_dump(mode="json")
        self.rounds.append({"round": index, "epoch": epoch, "chosen": new})
        return bool(todo)

    def records(self) -> dict[str, MPORecord]:
        """Records of the matrices decomposed by the rounds (errors of the decomposition)."""
        return {n: MPORecord.model_validate(r) for n, r in self._records.items()}

    def selection(self) -> SelectionRecord:
        """The manifest's `selection` (the `select` stage's schema, every round filled in)."""
        rounds = [
            *self.rounds,
            *(
                {"round": k, "epoch": k * self.interval, "chosen": None}
                for k in range(len(self.rounds), self.split_num)
            ),
        ]
        return SelectionRecord.model_validate(
            {
                "method": "fisher",
                "weight_types": self.weight_types,
                "top_n": self.top_n,
                "split_num": self.split_num,
                **self.info,
                "scores": self.scores,
                "patterns": self.patterns,
                "chosen": self.chosen,
                "schedule": {
                    "split_num": self.split_num,
                    "per_round": self.top_n // self.split_num,
                    "epochs": self.epochs,
                    "interval": self.interval,
                    "rounds": rounds,
                },
            }
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "scores": self.scores,
            "patterns": self.patterns,
            "records": self._records,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]
        self.scores = state["scores"]
        self.patterns = state["patterns"]
        self._records = state["records"]


@dataclass(frozen=True)
class DynamicPlan:
    """What a dynamic run asks for: `top_n` matrices per weight pattern over `split_num`
    rounds, among the `weight_types` (flags; None: the input's selection, else defaults)."""

    top_n: int | None = None
    split_num: int | None = None
    weight_types: list[str] | None = None

    def resolve(self, selection: SelectionRecord | None) -> tuple[int, int, list[str]]:
        """(top_n, split_num, weight_types): the flags, else the input's selection; top_n
        must be a multiple of split_num."""
        return _resolve(self, selection or SelectionRecord())


def _resolve(plan: DynamicPlan, selection: SelectionRecord) -> tuple[int, int, list[str]]:
    top_n = plan.top_n if plan.top_n is not None else selection.top_n
    split_num = plan.split_num if plan.split_num is not None else selection.split_num or 1
    weight_types = plan.weight_types or selection.weight_types or list(DYNAMIC_WEIGHT_TYPES)
    if top_n is None or top_n % split_num:
        raise UsageError(
            f"--dynamic needs --top-n N divisible by --split-num K (got top-n {top_n}, "
            f"split-num {split_num})",
            hint="e.g. --dynamic --split-num 2 --top-n 4",
        )
    unknown = [w for w in weight_types if w not in DYNAMIC_WEIGHT_TYPES]
    if unknown:
        raise UsageError(
            f"--weight-types {','.join(unknown)}: dynamic selection scores "
            f"{', '.join(DYNAMIC_WEIGHT_TYPES)}",
            hint="e.g. --weight-types FFN_1,FFN_2,attention",
        )
    return int(top_n), int(split_num), list(weight_types)


def dynamic_selection(
    net: nn.Module,
    plan: DynamicPlan,
    selection: SelectionRecord | None,
    *,
    records: Mapping[str, ModuleRecord],
    rows: list[dict[str, Any]],
    collator: Any,
    epochs: int,
    batch_size: int,
    num_cores: int,
    info: dict[str, Any],
) -> DynamicSelection:
    """The dynamic-selection hook. Top-n, split-num and weight types default to those of the
    input's `selection`; when they match it, its choice is round 0 and its scores are kept.
    `info` (seed, data) is recorded in the selection as it is."""
    selection = selection or SelectionRecord()
    top_n, split_num, weight_types = plan.resolve(selection)
    same = selection.has_choice and (top_n, split_num, list(weight_types)) == (
        selection.top_n,
        selection.split_num,
        selection.weight_types,
    )
    carried = carried_selection(net, selection) if same else None
    hook = DynamicSelection(
        model_type=net.config.model_type,  # type: ignore[attr-defined]
        weight_types=list(weight_types),
        top_n=int(top_n),
        split_num=int(split_num),
        epochs=epochs,
        rows=rows,
        collator=collator,
        batch_size=batch_size,
        num_cores=num_cores,
        already=[n for n in records if carried is None or n not in carried.chosen],
        round0=carried.chosen if carried is not None else None,
        info=info,
    )
    if carried is not None:
        hook.scores.update(carried.scores)
        hook.patterns.update(carried.patterns)
    return hook
