"""load_model: an artifact as a live Hugging Face model with its methods' layers in place.

Everything that is not a transformed module is loaded by `transformers` itself
(`from_pretrained` on the artifact directory, which holds a normal config and safetensors
files); each module record's method then installs its layers (MPO cores become `MPOLinear` /
`MPOEmbedding` layers). A module with a pruning mask (`prune`) whose method has a dense form
runs merged instead, its pruned entries zero: what `merge` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from mposurgeon.artifact.manifest import ModuleRecord, load_artifact
from mposurgeon.artifact.tensors import TensorReader, open_tensors
from mposurgeon.methods.registry import get_method
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.pruning import masked_key
from mposurgeon.models.surgery import resolve_module_name


def load_model(
    artifact: str | Path,
    task: str = "auto",
    *,
    forward_mode: ForwardMode = "auto",
    verify: bool = True,
    config: Any | None = None,
) -> nn.Module:
    """The artifact's model with its methods' layers (MPO layers) in place, in eval mode.

    `task` picks the head ("auto": the base checkpoint's own class). `forward_mode` fixes how
    MPO layers evaluate ("reconstruct" the dense weight or "contract" the input; "auto" picks
    the cheaper per call). `config` overrides the stored config (e.g. labels of a new head).
    """
    path = Path(artifact)
    manifest = load_artifact(path, verify=verify)
    config = config or AutoConfig.from_pretrained(path)
    with quiet_transformers():
        model = model_class(config, task).from_pretrained(
            path, config=config, ignore_mismatched_sizes=True
        )
    by_method: dict[str, list[ModuleRecord]] = {}
    with open_tensors(path) as reader:
        masks = {t: key for key in reader.keys() if (t := masked_key(key)) is not None}
        for rec in manifest.modules.values():
            if (kept := _within(model, rec)) is None:
                continue
            if rec.weight_key in masks and get_method(rec.method).has_dense_form:
                _load_merged(model, kept, reader, masks)  # pruned: it runs as merge writes it
            else:
                by_method.setdefault(rec.method, []).append(kept)
        for method, records in by_method.items():
            get_method(method).install(model, records, reader, forward_mode)
    return model.eval()


@torch.no_grad()
def _load_merged(
    model: nn.Module, rec: ModuleRecord, reader: TensorReader, masks: dict[str, str]
) -> None:
    """Put the dense tensors of `rec`'s module into `model`, pruned entries zeroed, as
    `merge` writes them: a pruned module of a method with a separate update (LoRA's B A)
    keeps its zeros only in merged form."""
    for key, tensor in get_method(rec.method).dense_tensors(rec, reader).items():
        if key in masks:
            tensor = tensor.masked_fill(reader.get(masks[key]).bool(), 0.0)
        module_name, _, param = key.rpartition(".")
        target = getattr(model.get_submodule(resolve_module_name(model, module_name)), param)
        target.copy_(tensor.to(target.dtype))


def _within(model: nn.Module, rec: ModuleRecord) -> ModuleRecord | None:
    """`rec` restricted to the modules `model` has: a head of another task drops what the
    checkpoint's own head held (a classifier has no LM head tied to the embeddings); None if
    the model lacks the module itself."""

    def has(name: str) -> bool:
        try:
            resolve_module_name(model, name)
        except KeyError:
            return False
        return True

    if not has(rec.name):
        return None
    tied = [key for key in rec.tied_keys if has(key.removesuffix(".weight"))]
    return rec.model_copy(update={"tied_keys": tied})
