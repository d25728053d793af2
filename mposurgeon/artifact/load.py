"""load_model: an artifact as a live Hugging Face model with its methods' layers in place.

Everything that is not a transformed module is loaded by `transformers` itself
(`from_pretrained` on the artifact directory, which holds a normal config and safetensors
files); each module record's method then installs its layers (MPO cores become `MPOLinear` /
`MPOEmbedding` layers). A module with a pruning mask (`prune`) keeps its layers and computes
with its pruned entries zero whatever its update holds (`Method.keep_zeros`): what `merge`
writes, and what training saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mposurgeon.artifact.config import read_config
from mposurgeon.artifact.manifest import ModuleRecord, load_artifact
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.methods.registry import get_method
from mposurgeon.models.auto import model_class, quiet_transformers
from mposurgeon.models.layers import ForwardMode
from mposurgeon.models.pruning import mask_key
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
    config = config or read_config(path)
    with quiet_transformers():
        model = model_class(config, task).from_pretrained(
            path, config=config, ignore_mismatched_sizes=True
        )
    by_method: dict[str, list[ModuleRecord]] = {}
    with open_tensors(path) as reader:
        for rec in manifest.modules.values():
            if (kept := _within(model, rec)) is not None:
                by_method.setdefault(rec.method, []).append(kept)
        for method, records in by_method.items():
            get_method(method).install(model, records, reader, forward_mode)
        keys = set(reader.keys())
        for records in by_method.values():
            for rec in records:
                if (key := mask_key(rec.weight_key)) in keys:
                    live = resolve_module_name(model, rec.name)
                    mask = reader.get(key).to(torch.bool)
                    get_method(rec.method).keep_zeros(model, live, mask, rec.kind)
    return model.eval()


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
