"""Bring your own training loop, as with PEFT: `prepare` a live `transformers` model for a
method, train it with your loop or `transformers.Trainer`, then `save_artifact` it (an artifact
like `train` writes, with lineage) or `merge_and_unload` it (the dense model `merge` gives).

    >>> model = AutoModelForSequenceClassification.from_pretrained("minilm-dir", num_labels=2)
    >>> model = mposurgeon.prepare(model, method="lightweight", layers=["FFN_1", "FFN_2"])
    >>> model.mposurgeon.summary()       # "trainable params: ... || all params: ... || ..."
    >>> Trainer(model=model, args=..., train_dataset=...).train()
    >>> mposurgeon.save_artifact(model, "tuned", tokenizer=tokenizer)
    >>> dense = mposurgeon.merge_and_unload(model)   # a plain model of the same class

`prepare` changes the model in place (as PEFT's `inject_adapter_in_model`) and returns it:
methods that train MPO cores (`lightweight`, `overparam`, `full` given `layers`) first
decompose the chosen matrices losslessly; every method then installs its layers and sets
`requires_grad` exactly as `train --method` does. The model must come from a checkpoint on
disk (`from_pretrained` of a directory, a cached hub id, or `load_model` of an artifact):
`save_artifact` copies its config and tokenizer files and records it as the base.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from torch import nn

from mposurgeon.artifact.manifest import ModuleRecord
from mposurgeon.artifact.store import check_output_dir
from mposurgeon.errors import ModelNotFoundError, UsageError
from mposurgeon.methods.base import Method, TrainingSource
from mposurgeon.methods.config import ModuleRegex, WeightGroups
from mposurgeon.methods.mpo.config import MPOTrainingConfig
from mposurgeon.methods.mpo.state import decompose_in_place
from mposurgeon.methods.registry import get_method, method_config
from mposurgeon.models.groups import select_targets
from mposurgeon.models.surgery import resolve_module_name
from mposurgeon.stages.common import StageInput, StageOptions, open_input, write_live_model
from mposurgeon.stages.decompose import DEFAULT_LAYERS  # what `decompose` takes
from mposurgeon.training.params import count_parameters, unique_state_dict

#: The attribute of a prepared model holding its `PreparedState`.
STATE_ATTRIBUTE = "mposurgeon"


class PrepareOptions(StageOptions):
    """How a model was prepared: the method with its options, and the matrices decomposed
    for it (recorded in the artifact's lineage as the `prepare` stage)."""

    method: str
    method_options: dict[str, Any] = Field(default_factory=dict)
    layers: WeightGroups = None
    target_modules: ModuleRegex = None
    exclude_modules: ModuleRegex = None
    num_cores: int = Field(5, ge=2, le=64)


@dataclass
class PreparedState:
    """What `prepare` attached to a model (`model.mposurgeon`): the method, the records of the
    modules it transformed (live names) and the checkpoint the model came from."""

    method: Method
    records: dict[str, ModuleRecord]
    source: StageInput
    options: PrepareOptions
    decomposed: list[str] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> str:
        """PEFT's `print_trainable_parameters` line, without printing it."""
        assert self.model is not None
        count = count_parameters(self.model)
        share = 100 * count.trainable / count.total if count.total else 0.0
        return (
            f"trainable params: {count.trainable:,} || all params: {count.total:,} || "
            f"trainable%: {share:.4f}"
        )


def prepare(
    model: nn.Module,
    method: str = "lightweight",
    *,
    layers: list[str] | str | None = None,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    num_cores: int = 5,
    **method_options: Any,
) -> nn.Module:
    """Make `model` (a `transformers` model, changed in place) train with `method`, and
    return it.

    A method that trains MPO cores decomposes `layers` / `target_modules` (groups or a regex
    of whole module names, as `decompose`; default FFN_1, FFN_2, attention) losslessly into
    `num_cores` cores first; for the other methods `target_modules` and the rest of
    `method_options` are the method's own options (`train --method M --help`).
    """
    if hasattr(model, STATE_ATTRIBUTE):
        raise UsageError(
            f"this {type(model).__name__} is already prepared for "
            f"{getattr(model, STATE_ATTRIBUTE).method.name}",
            hint="prepare a freshly loaded model",
        )
    config_class = method_config(method, training=True)
    trains_cores = issubclass(config_class, MPOTrainingConfig)
    if not trains_cores:  # the selection options are the method's own, where it has them
        given = {
            "layers": layers,
            "target_modules": target_modules,
            "exclude_modules": exclude_modules,
        }
        for key, value in given.items():
            if value is None:
                continue
            if key not in config_class.model_fields:
                raise UsageError(
                    f"{method} decomposes nothing and has no {key} option",
                    hint=f"its options: {', '.join(config_class.options())}",
                )
            method_options[key] = value
        layers = target_modules = exclude_modules = None
    try:
        config = config_class(**method_options)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or method
        raise UsageError(
            f"{method} option {where}: {first['msg']}",
            hint=f"its options: {', '.join(config_class.options())}",
        ) from None
    options = PrepareOptions(
        method=method,
        method_options=method_options,
        layers=layers,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        num_cores=num_cores,
    )
    impl = get_method(config)
    if _has_training_hooks(impl):
        raise UsageError(
            f"{method} adds to the loss or the optimizer step (MPOE's load-balancing loss and "
            "gradient mask), which only `mposurgeon train` applies",
            hint=f"train it with `mposurgeon train --method {method}`",
        )
    source = _source_of(model)
    if source.manifest is not None and any(e.stage == "prune" for e in source.manifest.lineage):
        raise UsageError(
            f"{source.path} is pruned, and a prepared model would not keep its zeros",
            hint="train a pruned artifact with `mposurgeon train`, which keeps its masks",
        )
    records = _live_records(model, source)
    decomposed: list[str] = []
    if trains_cores and (
        layers is not None or target_modules is not None or _refuses(impl, source, records)
    ):
        todo = _targets(model, options, records)
        decomposed = list(todo)
        records.update(decompose_in_place(model, todo, num_cores))
    impl.check_source(TrainingSource(path=str(source.path), records=records))
    records.update(impl.prepare(model, records, []))
    impl.set_trainable(model)
    state = PreparedState(impl, records, source, options, decomposed)
    object.__setattr__(model, STATE_ATTRIBUTE, state)  # a plain attribute, not a submodule
    state.model = model
    return model


def save_artifact(
    model: nn.Module,
    output: str | Path,
    *,
    tokenizer: Any = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "auto",
) -> Path:
    """Write a prepared (and trained) model as an mposurgeon artifact at `output`: what
    `train` writes, so `load_model`, `merge`, `inspect`, `truncate`... read it. Its lineage
    is the model's source checkpoint (and that artifact's lineage), then `prepare` with the
    method's options. `tokenizer` is saved with it; else the source's tokenizer files are
    copied. Returns the artifact's path."""
    state = prepared_state(model)
    out = Path(output)
    opts = PrepareOptions.model_validate(
        {
            **state.options.model_dump(),
            "output": out,
            "overwrite": overwrite,
            "max_shard_size": max_shard_size,
        }
    )
    check_output_dir(out, inputs=[state.source.path], overwrite=overwrite)
    records = state.method.trained_records(model, dict(state.records))
    with torch.no_grad():
        write_live_model(
            out,
            state.method,
            model,
            tokenizer,
            state.source,
            opts,
            records,
            dict(metrics or {}),
            None,
            stage="prepare",
        )
    return out


def merge_and_unload(model: nn.Module, *, dtype: str = "auto") -> nn.Module:
    """The dense model a prepared model stands for: a new model of the same class, as
    `merge` writes it and `from_pretrained` loads it: in eval mode, in the checkpoint's dtype
    unless `dtype` (as `merge --dtype`); `model` is left as it is. It goes through a temporary
    artifact and merged checkpoint on disk, so it is exactly `save_artifact` then `merge`."""
    from mposurgeon.models.auto import quiet_transformers
    from mposurgeon.stages.merge import merge

    prepared_state(model)
    with tempfile.TemporaryDirectory(prefix="mposurgeon-merge-") as tmp:
        artifact = save_artifact(model, Path(tmp) / "artifact")
        merged = merge(artifact, output=Path(tmp) / "merged", dtype=dtype).output
        with quiet_transformers():
            dense = type(model).from_pretrained(merged)
    return dense.eval()


def prepared_state(model: nn.Module) -> PreparedState:
    """The `PreparedState` of a model `prepare` returned; a UsageError for any other."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if not isinstance(state, PreparedState):
        raise UsageError(
            f"this {type(model).__name__} was not prepared by mposurgeon",
            hint="call mposurgeon.prepare(model, method=...) before training it",
        )
    return state


def _source_of(model: nn.Module) -> StageInput:
    """The checkpoint (or artifact) `model` was loaded from, by its `name_or_path`."""
    where = getattr(model, "name_or_path", "") or ""
    hint = (
        "load the model with from_pretrained(PATH) (or mposurgeon.load_model) from a "
        "checkpoint on disk: the artifact copies its config and tokenizer from there"
    )
    if not where:
        raise UsageError(f"this {type(model).__name__} was not loaded from a checkpoint", hint=hint)
    try:
        return open_input(where, StageOptions(offline=True))
    except ModelNotFoundError as err:
        raise UsageError(f"the checkpoint this model came from is gone: {err}", hint=hint) from err


def _has_training_hooks(method: Method) -> bool:
    """Whether `method` adds a loss or acts before optimizer steps (a user's loop would not)."""
    cls = type(method)
    return (
        cls.training_loss is not Method.training_loss
        or cls.before_optimizer_step is not Method.before_optimizer_step
    )


def _live_records(model: nn.Module, source: StageInput) -> dict[str, ModuleRecord]:
    """The source artifact's module records under the model's live names (what `load_model`
    installed); empty for a plain checkpoint."""
    records: dict[str, ModuleRecord] = {}
    for rec in source.modules.values():
        try:
            live = resolve_module_name(model, rec.name)
        except KeyError:
            continue  # a module this head lacks (an untied LM head)
        records[live] = rec.model_copy(update={"name": live, "weight_key": f"{live}.weight"})
    return records


def _refuses(method: Method, source: StageInput, records: dict[str, ModuleRecord]) -> bool:
    """Whether `method` cannot train the model as it is (an MPO method without MPO modules)."""
    try:
        method.check_source(TrainingSource(path=str(source.path), records=records))
    except UsageError:
        return True
    return False


def _targets(
    model: nn.Module, options: PrepareOptions, records: dict[str, ModuleRecord]
) -> list[str]:
    """Live names of the dense matrices to decompose (those already MPO left out)."""
    layers = options.layers
    if layers is None and options.target_modules is None:
        layers = DEFAULT_LAYERS
    keys = set(unique_state_dict(model)[0]) | {f"{name}.weight" for name in records}
    targets = select_targets(
        model,
        keys,
        layers=layers,
        target_modules=options.target_modules,
        exclude_modules=options.exclude_modules,
    )
    todo = [t.name for t in targets if t.name not in records]
    if not todo:
        raise UsageError(
            "every selected matrix is already held as MPO cores",
            hint="prepare without layers, or select other matrices",
        )
    if any(not torch.is_floating_point(model.get_submodule(n).weight) for n in todo):
        raise UsageError("only floating-point weights can be decomposed")
    return todo
