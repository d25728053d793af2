"""A checkpoint's `config.json`, read and checked before `transformers` builds anything from it.

`transformers` reports a broken config in messages of many lines, or not at all (a negative
size, a JSON list); here every problem is one line naming config.json and the field.

An artifact whose weights `transformers` cannot load as they are (any module held by a method:
MPO cores, LoRA, ...) must not pass for a plain checkpoint: `from_pretrained` would build the
model, initialize the missing dense weights at random and return a wrong model without an error.
So its config.json says `attn_implementation: ARTIFACT_MARK`: `transformers` refuses to build
any model from it, through every class (`AutoModel...`, `BertModel...`, `from_config`), with
`ValueError: Specified attn_implementation="<ARTIFACT_MARK>" is not supported...`, and the mark
says what to do. The config stays valid JSON that `AutoConfig` and tokenizers read; a value
the base config had is kept under `MARK_KEPT` and put back by `read_config`, which every
reader here goes through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mposurgeon.artifact.jsonfile import read_json_object
from mposurgeon.errors import ArtifactError, one_line
from mposurgeon.models.layout import CONFIG_HINT, CONFIG_NAME

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: The `attn_implementation` of an artifact's config.json (see the module doc).
ARTIFACT_MARK = (
    "mposurgeon-artifact: this folder holds MPO cores or adapters, not a plain checkpoint; "
    "load it with mposurgeon.load_model(PATH), or write a dense checkpoint with "
    "`mposurgeon merge PATH`"
)
#: The config.json keys that choose the attention implementation (either one is read).
_MARK_KEYS = ("attn_implementation", "_attn_implementation")
#: Where the base config's own attention implementation is kept while the mark stands.
MARK_KEPT = "mposurgeon_attn_implementation"

#: Config fields that hold sizes or counts (never negative); ids, indices and windows excepted.
_SIZE_FIELD = re.compile(r"size|dim|layers?$|heads|vocab|embd|positions|experts|^n_|^num_|^d_")
_NOT_SIZE_FIELD = re.compile(r"_ids?$|_idx$|index|window|token")


def _config_error(path: Path, what: str, hint: str = CONFIG_HINT) -> ArtifactError:
    return ArtifactError(f"{path / CONFIG_NAME} {what}", hint=hint)


def read_config(path: Path) -> PretrainedConfig:
    """The `transformers` config of the checkpoint in directory `path`, checked first: the file
    must be a JSON object with a known `model_type` and no negative size. Every problem is an
    ArtifactError of one line naming config.json and the field."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise _config_error(
            path, "is missing", hint="a checkpoint directory holds the config.json of its model"
        )
    data = read_json_object(path / CONFIG_NAME, lambda what: _config_error(path, what))
    model_type = data.get("model_type")
    if model_type is None:
        raise _config_error(
            path, "has no model_type field", hint='add one, e.g. "model_type": "bert"'
        )
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        custom = " (its auto_map names custom code, which mposurgeon never runs)"
        raise _config_error(
            path,
            f"has model_type {model_type!r}, which transformers does not know"
            + (custom if "auto_map" in data else ""),
            hint="check config.json, or upgrade transformers",
        )
    if (bad := _negative_size(data)) is not None:
        raise _config_error(path, f"has {bad[0]} {bad[1]}: a size or count is never negative")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers and huggingface_hub raise many kinds
        what = f"is not a valid {model_type} config: {one_line(err)}"
        raise _config_error(path, what) from err
    return without_mark(config)


def without_mark(config: PretrainedConfig) -> PretrainedConfig:
    """`config` (read from an artifact) with the base's attention implementation put back in
    place of `ARTIFACT_MARK`, so models can be built from it; others pass unchanged."""
    if getattr(config, "_attn_implementation", None) == ARTIFACT_MARK:
        config._attn_implementation = getattr(config, MARK_KEPT, None)
    if hasattr(config, MARK_KEPT):
        delattr(config, MARK_KEPT)
    return config


def unmarked_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json object as its base checkpoint's: `ARTIFACT_MARK` replaced by the attention
    implementation it kept, under `attn_implementation` (the spelling `set_artifact_mark`
    puts back). Two configs that build the same model this way give equal objects."""
    unmarked = dict(data)
    if unmarked.get(_MARK_KEYS[0]) == ARTIFACT_MARK:
        kept = unmarked.pop(MARK_KEPT, None)
    else:
        kept = next((unmarked[k] for k in _MARK_KEYS if unmarked.get(k) is not None), None)
    for key in _MARK_KEYS:
        unmarked.pop(key, None)
    if kept is not None:
        unmarked[_MARK_KEYS[0]] = kept
    return unmarked


def set_artifact_mark(directory: Path, marked: bool) -> None:
    """Mark `directory/config.json` as an artifact's (`marked`) or as a plain checkpoint's
    (the mark removed, the base's attention implementation put back); no config.json, or one
    already as asked, is left alone."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return
    data = read_json_object(path, lambda what: _config_error(Path(directory), what))
    is_marked = data.get(_MARK_KEYS[0]) == ARTIFACT_MARK
    if is_marked == marked:
        return
    if marked:
        kept = next((data.pop(k) for k in _MARK_KEYS if data.get(k) is not None), None)
        for key in _MARK_KEYS:
            data.pop(key, None)
        if kept is not None:
            data[MARK_KEPT] = kept
        data[_MARK_KEYS[0]] = ARTIFACT_MARK
    else:
        data.pop(_MARK_KEYS[0], None)
        if (kept := data.pop(MARK_KEPT, None)) is not None:
            data[_MARK_KEYS[0]] = kept
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _negative_size(data: Mapping[str, Any], prefix: str = "") -> tuple[str, int] | None:
    """The first (field, value) of `data` (or of a nested config) that is a negative size."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and len(prefix) < 200:
            if (bad := _negative_size(value, name + ".")) is not None:
                return bad
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value < 0
            and _SIZE_FIELD.search(key)
            and not _NOT_SIZE_FIELD.search(key)
        ):
            return name, value
    return None
