"""A PEFT adapter directory as the input of `merge` and `eval`.

A PEFT adapter directory is what `peft.PeftModel.save_pretrained` (and `export-peft`) writes:
`adapter_config.json` and `adapter_model.safetensors`, no base weights. The story:

- read and check the directory (`read_adapter`): the config is a JSON object naming a
  `peft_type` this module handles (LoRA and IA3, which have a dense form, and prompt tuning,
  p-tuning and prefix tuning, which add virtual tokens) and a `task_type` with a head we load
  (`SEQ_CLS`, `CAUSAL_LM`, `SEQ_2_SEQ_LM`, `FEATURE_EXTRACTION` or none); the weights file is
  there and its header reads;
- find the base model (`open_base`): `--base`, else the config's `base_model_name_or_path`, a
  local path, an alias or a hub id resolved from the local cache only (nothing is downloaded);
  an mposurgeon artifact is a base only without transformed modules (merge it first);
- give the base's config the adapter's head (`head_config`): the class of the task type, and
  for a sequence classifier the number of labels of the head the adapter saved (its
  `modules_to_save` weights: which tensors' sizes are the number of labels is read off the
  model built twice on the meta device, with 2 and with 3 labels);
- load the base with that head and `peft.PeftModel.from_pretrained(base, DIR)` on it
  (`load_peft_model`), refusing a base that would keep random weights (a head neither the base
  nor the adapter holds) or that has no place for some of the adapter's tensors.

`merge_adapter` then folds a LoRA or IA3 update into the weights (`merge_and_unload`) and writes
a plain checkpoint as `merge` writes one; `eval` scores the `PeftModel` as it is
(`peft_setup`, `adapter_labels`).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.manifest import MANIFEST_NAME
from mposurgeon.artifact.store import atomic_directory, check_output_dir, release_claim
from mposurgeon.artifact.tensors import ShardedWriter, open_tensors
from mposurgeon.errors import (
    ArtifactError,
    DataError,
    ModelNotFoundError,
    UsageError,
    one_line,
)
from mposurgeon.models.auto import (
    has_head,
    head_class_name,
    model_class,
    quiet_transformers,
    trained_head,
)
from mposurgeon.models.probe import model_output, sample_batch
from mposurgeon.progress import ProgressCallback
from mposurgeon.stages.common import (
    FLOAT_DTYPES,
    InputOptions,
    StageInput,
    finish_artifact,
    open_input,
    plan_output,
    verified_input,
)
from mposurgeon.stages.merge import MergeOptions, MergeResult, check_merged, verify_tokenizer
from mposurgeon.training.data import TextDataset
from mposurgeon.training.model import (
    ModelSetup,
    classifier_labels,
    ensure_pad_token,
    load_tokenizer,
)
from mposurgeon.training.params import unique_state_dict
from mposurgeon.training.tasks import Task

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: PEFT types whose update has a dense form: `merge_and_unload` folds it into the weights.
DENSE_TYPES = ("LORA", "IA3")
#: PEFT types that add virtual tokens (prompt learning): `eval` runs them, `merge` refuses them.
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
#: PEFT task type -> the head (`models.auto.TASKS`) the base is loaded with; no task type: the
#: class the base's config names.
TASK_HEADS: dict[str | None, str] = {
    "SEQ_CLS": "sequence-classification",
    "CAUSAL_LM": "causal-lm",
    "SEQ_2_SEQ_LM": "seq2seq-lm",
    "FEATURE_EXTRACTION": "base",
    None: "auto",
}
_FIX_BASE = "pass --base with the model the adapter was trained on (a directory or hub id)"


@dataclass(frozen=True)
class PeftAdapter:
    """A checked PEFT adapter directory: its config, and its tensors' names and shapes as
    `adapter_model.safetensors` stores them."""

    path: Path
    config: dict[str, Any]
    peft_type: str
    task_type: str | None
    base_model: str | None  # `base_model_name_or_path`, as recorded
    shapes: dict[str, tuple[int, ...]]

    @property
    def head(self) -> str:
        """The head the base is loaded with (a `models.auto.TASKS` key)."""
        return TASK_HEADS[self.task_type]

    @property
    def has_dense_form(self) -> bool:
        return self.peft_type in DENSE_TYPES

    @property
    def live_shapes(self) -> dict[str, tuple[int, ...]]:
        """The adapter's tensors under the wrapped model's parameter names
        (`base_model.model.classifier.weight` -> `classifier.weight`; prompt learning wraps
        the model one level less deep)."""
        prefix = "base_model." if self.peft_type in PROMPT_TYPES else "base_model.model."
        out = {}
        for key, shape in self.shapes.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            for wrapper in (".modules_to_save.default.", ".modules_to_save.", ".original_module."):
                name = name.replace(wrapper, ".")
            out[name] = shape
        return out


def is_adapter_dir(spec: str | Path) -> bool:
    """Whether `spec` is a local directory holding `adapter_config.json` (and no artifact
    manifest): a PEFT adapter, whatever state its files are in."""
    path = Path(spec).expanduser()
    return (path / ADAPTER_CONFIG).is_file() and not (path / MANIFEST_NAME).is_file()


def read_adapter(spec: str | Path) -> PeftAdapter:
    """Read and check the PEFT adapter directory `spec` (see the module's docstring)."""
    path = Path(spec).expanduser()
    config_file = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ArtifactError(
            f"{config_file} cannot be read as JSON ({one_line(err, 120)})",
            hint="restore the adapter directory, or save it again with save_pretrained",
        ) from None
    if not isinstance(config, dict):
        raise ArtifactError(
            f"{config_file} is not a JSON object",
            hint="restore the adapter directory, or save it again with save_pretrained",
        )
    peft_type = config.get("peft_type")
    known = (*DENSE_TYPES, *PROMPT_TYPES)
    if peft_type not in known:
        raise UsageError(
            f"{path} is a {peft_type or 'untyped'} PEFT adapter: merge and eval read "
            f"{', '.join(known)} adapters",
            hint="load it with peft.PeftModel.from_pretrained(base, DIR)",
        )
    task_type = config.get("task_type")
    if task_type not in TASK_HEADS:
        raise UsageError(
            f"{path} is a PEFT adapter for the task type {task_type}: merge and eval read "
            f"{', '.join(t for t in TASK_HEADS if t)} adapters (or none)",
            hint="load it with peft.PeftModel.from_pretrained(base, DIR)",
        )
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ArtifactError(f"{config_file}: base_model_name_or_path is not a string: {base!r}")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        bin_only = (path / "adapter_model.bin").exists()
        legacy = " (only the legacy adapter_model.bin)" if bin_only else ""
        raise ArtifactError(
            f"{path} has no {ADAPTER_WEIGHTS}{legacy}: the adapter's weights are missing",
            hint="save the adapter with save_pretrained (safetensors), or restore the directory",
        )
    with open_tensors(weights) as reader:  # a damaged header is an ArtifactError naming it
        shapes = {key: reader.shape(key) for key in reader.keys()}
    if not shapes:
        raise ArtifactError(f"{weights} holds no tensors", hint="restore the adapter directory")
    return PeftAdapter(path, config, peft_type, task_type, base or None, shapes)


def open_base(adapter: PeftAdapter, base: str | None, options: InputOptions) -> StageInput:
    """The adapter's base model: `base` (`--base`), else the one its config records, resolved
    from local files only. Its checksums are checked when it is an artifact."""
    spec = base or adapter.base_model
    if not spec:
        raise UsageError(
            f"{adapter.path}/{ADAPTER_CONFIG} records no base model (base_model_name_or_path)",
            hint=_FIX_BASE,
        )
    revision = options.revision if base else options.revision or adapter.config.get("revision")
    local = InputOptions(
        revision=revision,
        offline=True,  # a base is never downloaded: the hub cache, or a local directory
        cache_dir=options.cache_dir,
        verify_checksums=options.verify_checksums,
    )
    where = "--base" if base else f"recorded in {ADAPTER_CONFIG}"
    try:
        inp = open_input(spec, local)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(
            f"base model {spec} ({where}) of the adapter {adapter.path}: {err}",
            hint=_FIX_BASE if not base else err.hint,
        ) from None
    if inp.modules:
        methods = ", ".join(sorted({rec.method for rec in inp.modules.values()}))
        raise UsageError(
            f"the base model {inp.path} is an mposurgeon artifact with {methods} modules: a "
            "PEFT adapter applies to a dense checkpoint",
            hint=f"merge it first (mposurgeon merge {inp.path} -o DENSE) and pass --base DENSE",
        )
    return inp


def head_config(adapter: PeftAdapter, base: StageInput) -> Any:
    """The base's config with the adapter's head: `architectures` names the class of the
    task type's head; a sequence classifier gets the number of labels of the head the adapter
    saved. When the base is a classifier with that many labels its label names are kept,
    else they are transformers' defaults (LABEL_0, ...) and the problem type is unset."""
    config = read_config(base.path)
    head = adapter.head
    if head == "auto":
        return config
    if head != "base" and not has_head(config, head):
        raise UsageError(
            f"the base model {base.path} is a {config.model_type} model, which has no "
            f"{head} head in transformers, and the adapter {adapter.path} is for "
            f"{adapter.task_type}",
            hint=_FIX_BASE,
        )

    was_classifier = trained_head(config) == "sequence-classification"
    config.architectures = [head_class_name(config, head)]
    if head != "sequence-classification":
        return config
    size = _head_size(adapter, config)
    if size is None:
        if was_classifier:
            return config  # the base's own trained head
        raise UsageError(
            f"the adapter {adapter.path} is for SEQ_CLS but saves no classification head "
            f"(modules_to_save), and the base model {base.path} has none: it would be random",
            hint="pass --base with the classifier the adapter was trained on",
        )
    if not (was_classifier and config.num_labels == size):
        config.num_labels = size
        config.id2label = {i: f"LABEL_{i}" for i in range(size)}
        config.label2id = {name: i for i, name in config.id2label.items()}
        config.problem_type = None
    return config


def _head_size(adapter: PeftAdapter, config: Any) -> int | None:
    """The number of labels of the classification head the adapter saved, or None when it
    saves none. The tensors whose size is the number of labels (and along which axis) are those
    that differ between the classifier built with 2 and with 3 labels (on the meta device)."""
    shapes = []
    for labels in (2, 3):
        probe = copy.deepcopy(config)
        probe.num_labels = labels
        with torch.device("meta"), quiet_transformers():
            net = model_class(probe, "sequence-classification").from_config(probe)
        shapes.append({n: tuple(p.shape) for n, p in net.named_parameters()})
    saved = adapter.live_shapes
    for name, two in shapes[0].items():
        three = shapes[1].get(name)
        if three is None or three == two or name not in saved:
            continue
        axis = next(i for i, (a, b) in enumerate(zip(two, three, strict=True)) if a != b)
        return saved[name][axis]
    return None


def adapter_labels(adapter: PeftAdapter, config: Any, data: TextDataset) -> list[str]:
    """The label names of the adapter's classifier, in id order, for scoring `data`.

    A PEFT adapter records no label names, only its head's size (`config.num_labels`, from
    `head_config`). So: the base's own names when the base is a classifier of that size with
    names of its own; else the data's labels numbered as `train` numbers them (sorted,
    integers numerically, a `ClassLabel` column in its order). Integer labels all below the
    head's size are the ids themselves (data need not hold every class); other data must hold
    exactly as many labels as the head has outputs, or which id each has cannot be told."""
    size = config.num_labels
    labels = classifier_labels(adapter.path, config)
    if labels != [f"LABEL_{i}" for i in range(size)]:
        return labels
    names = data.labels
    if all(re.fullmatch(r"\d+", n) and int(n) < size for n in names):
        labels = [str(i) for i in range(size)]
    elif len(names) == size:
        labels = list(names)
    else:
        raise DataError(
            f"{data.name} holds {len(names)} labels ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) and the head of the adapter {adapter.path} "
            f"has {size} outputs: which label each output is cannot be told",
            hint=f"evaluate on data that holds all {size} labels, or labels 0..{size - 1}",
        )
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    return labels


def load_peft_model(
    adapter: PeftAdapter, base: StageInput, config: Any, dtype: torch.dtype | None = None
) -> Any:
    """The base (with `config`'s head; in `dtype`, or as transformers loads it) with the
    adapter loaded on it: a `peft.PeftModel` in eval mode. A weight that neither the base nor
    the adapter holds, or an adapter tensor the model has no place for, is an error."""
    import peft

    kwargs: dict[str, Any] = {"config": config, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if adapter.head == "sequence-classification":
        kwargs["ignore_mismatched_sizes"] = True  # a base classifier of another label count
    torch.manual_seed(0)  # the head is initialized before the adapter's replaces it
    try:
        with quiet_transformers():
            net, info = model_class(config, adapter.head).from_pretrained(base.path, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"cannot load the base model {base.path}: {one_line(err)}") from None
    missing = set(info["missing_keys"]) | {
        k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()
    }
    random = sorted(missing - set(adapter.live_shapes))
    if random:
        shown = ", ".join(random[:3]) + (f" and {len(random) - 3} more" if len(random) > 3 else "")
        raise UsageError(
            f"neither the base model {base.path} nor the adapter {adapter.path} holds "
            f"{shown}: they would be random",
            hint=_FIX_BASE,
        )
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what does not fit is checked below
            model = peft.PeftModel.from_pretrained(net, str(adapter.path), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UsageError(
            f"the adapter {adapter.path} does not fit the base model {base.path}: "
            f"{one_line(err, 200)}",
            hint=_FIX_BASE,
        ) from None
    # every tensor the adapter could hold ("auto" would look the base up on the hub)
    placed = set(peft.get_peft_model_state_dict(model, save_embedding_layers=True))
    homeless = sorted(set(adapter.shapes) - placed)
    if homeless:
        raise UsageError(
            f"the adapter {adapter.path} does not fit the base model {base.path}: "
            f"{len(homeless)} of its tensors ({', '.join(homeless[:2])}) have no place in it",
            hint=_FIX_BASE,
        )
    return model.eval()


def peft_setup(adapter: PeftAdapter, base: StageInput, config: Any, task: Task) -> ModelSetup:
    """The adapter on its base, as `eval` scores it: the `PeftModel` in eval mode (no merge),
    and the base's tokenizer with a pad token (as `training.model.trained_model` gives them)."""
    tokenizer = load_tokenizer(base.path, is_artifact=base.manifest is not None)
    pad = ensure_pad_token(tokenizer, config)
    model = load_peft_model(adapter, base, config)
    if adapter.peft_type in ("PROMPT_TUNING", "P_TUNING") and task.shift:
        model = _DropVirtualTokens(model, adapter.config.get("num_virtual_tokens", 0))
    return ModelSetup(model=model, tokenizer=tokenizer, pad_token_set=pad)


class _DropVirtualTokens(nn.Module):
    """A causal LM with prompt tuning gives logits for its virtual tokens too, ahead of the
    input's: drop them, so that logit t predicts input token t + 1 as the scorer expects."""

    def __init__(self, model: nn.Module, tokens: int) -> None:
        super().__init__()
        self.peft_model = model
        self.tokens = tokens

    def forward(self, **inputs: Any) -> Any:
        out = self.peft_model(**inputs)
        out.logits = out.logits[:, self.tokens :]
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():  # PEFT drops the position ids generate passes: fine
            warnings.filterwarnings("ignore", "Position ids are not supported")
            return self.peft_model.generate(*args, **kwargs)  # type: ignore[operator]

    @property
    def generation_config(self) -> Any:
        return self.peft_model.generation_config


# -- merge -------------------------------------------------------------------------------------


class AdapterMergeOptions(MergeOptions):
    """What the manifest records of a merge of an adapter: merge's options, and the adapter
    with its types and the base model it was folded into."""

    adapter: str
    peft_type: str
    task_type: str | None
    base_model: str


def merge_adapter(
    spec: str | Path, opts: MergeOptions, progress: ProgressCallback | None = None
) -> MergeResult:
    """`merge` of a PEFT adapter directory: fold a LoRA or IA3 update into its base's weights
    (`merge_and_unload`, in float32) and write a plain checkpoint: every weight in the dtype
    the base stores it in (`--dtype`: all of them in that one; a weight the base lacks, such
    as a new head, in the base's most common float dtype), the config with the adapter's head,
    the base's tokenizer files, a manifest and card naming base and adapter. With `verify`, the
    `PeftModel` and the written checkpoint run on the same input first (exit 3 if they differ,
    nothing written)."""
    adapter = read_adapter(spec)
    if not adapter.has_dense_form:
        raise UsageError(
            f"{adapter.path} is a {adapter.peft_type} adapter: its virtual tokens have no dense "
            "form, so merge cannot fold them into the weights",
            hint=f"load it with peft.PeftModel.from_pretrained(base, DIR), or score it with "
            f"mposurgeon eval {spec}",
        )
    base = open_base(adapter, opts.base, opts)
    config = head_config(adapter, base)
    stored = _stored_dtypes(base.path)
    out = plan_output(base, opts, "merge")
    try:
        check_output_dir(out, inputs=[adapter.path], overwrite=opts.overwrite)
        model = load_peft_model(adapter, base, config, dtype=torch.float32)
    except BaseException:
        release_claim(out)
        raise
    record = AdapterMergeOptions(
        **opts.model_dump(),
        adapter=str(adapter.path.resolve()),
        peft_type=adapter.peft_type,
        task_type=adapter.task_type,
        base_model=str(base.base.model_id or base.path),
    )
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged_modules = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    comparison = None
    with atomic_directory(out, overwrite=opts.overwrite) as tmp, verified_input(base):
        batch = sample_batch(config, verify_tokenizer(base.path)) if opts.verify else None
        reference = model_output(model.get_base_model(), batch) if batch is not None else None
        dense = model.merge_and_unload()
        tensors, _ = unique_state_dict(dense)
        main = _main_dtype(stored) if opts.dtype == "auto" else FLOAT_DTYPES[opts.dtype]
        prefix = getattr(dense, "base_model_prefix", "")
        with ShardedWriter(tmp, opts.shard_size(base.path)) as writer:
            for i, (key, tensor) in enumerate(tensors.items(), 1):
                if tensor.is_floating_point():
                    want = main if opts.dtype != "auto" else _stored(stored, key, prefix, main)
                    tensor = tensor.to(want)
                writer.add(key, tensor.contiguous())
                if progress is not None:
                    progress("merge", i, len(tensors))
        dense.config.dtype = main
        dense.config.save_pretrained(tmp)
        if reference is not None and batch is not None:
            comparison = check_merged(reference, tmp, batch, of="the PeftModel's")
        finish_artifact(
            tmp,
            inp=base,
            stage="merge",
            options=record,
            modules={},
            known_checksums=writer.checksums(),
            metrics={"verify": asdict(comparison) | {"ok": comparison.ok}} if comparison else None,
        )
    return MergeResult(
        output=out,
        merged_modules=merged_modules,
        comparison=comparison,
        peft_type=adapter.peft_type,
        base=record.base_model,
    )


def _stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    """The dtype each tensor of the checkpoint `path` is stored in."""
    with open_tensors(path) as reader:
        return {key: reader.dtype(key) for key in reader.keys()}


def _main_dtype(stored: dict[str, torch.dtype]) -> torch.dtype:
    """The float dtype most tensors of a checkpoint are stored in (float32 if none)."""
    counts = Counter(d for d in stored.values() if d.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32


def _stored(
    stored: dict[str, torch.dtype], key: str, prefix: str, default: torch.dtype
) -> torch.dtype:
    """The dtype the base stores the parameter `key` in (its file key with the model's
    `base_model_prefix` as the files have it, or not), else `default`."""
    dotted = prefix + "."
    for name in (key, key.removeprefix(dotted) if prefix else key, dotted + key):
        if name in stored:
            return stored[name]
    return default
