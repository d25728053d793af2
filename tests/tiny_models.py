"""Tiny random models of every supported architecture, with real word-level tokenizers: the
test suite's fixtures, and `python -m tests.tiny_models ARCH OUT [TEXT_FILES...]` for the
README's causal-LM example (nothing is downloaded: the weights are random, seeded).

Tiny on purpose: hidden 32, 2 layers, intermediate 64, vocab a few hundred. BERT's vocab is
1003 = 17 * 59, a size that needs padding to factorize into balanced modes.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_LLAMA: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# Architecture name -> (model class name, config class name, config kwargs).
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
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(**_LLAMA, tie_word_embeddings=False)),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(**_LLAMA, tie_word_embeddings=True)),
}

ARCHITECTURES: list[str] = list(TINY_MODELS)


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, dtype: Any = None) -> Path:
    """Build the tiny random model `arch`, save it to `out_dir` (in `dtype`, a torch dtype,
    if given: e.g. bfloat16 weights) and return that path."""
    import torch
    import transformers

    model_cls_name, config_cls_name, kwargs = TINY_MODELS[arch]
    config = getattr(transformers, config_cls_name)(**kwargs, **({"dtype": dtype} if dtype else {}))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


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


def build_tiny_tokenizer(arch: str, out_dir: Path, texts: Sequence[Path] = ()) -> None:
    """Save a word-level tokenizer over the words of the shipped sentiment data (and of the
    JSON Lines files `texts`: every string value of every row) into `out_dir`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, template, token_types = TINY_TOKENIZERS[arch]
    words: set[str] = set()
    files = [DATA_DIR / "sentiment-train.jsonl", DATA_DIR / "sentiment-eval.jsonl", *texts]
    for path in files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            for value in json.loads(line).values():
                if isinstance(value, str):
                    words |= set(re.findall(r"\w+|[^\w\s]", value.lower()))
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


def seeded_classifier(path: Path, num_labels: int = 2) -> Any:
    """`path`'s model with a sequence-classification head of `num_labels`, initialized under
    seed 0, in eval mode (the base a PET method starts from)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_pretrained(path, config=config).eval()


def sample_logits(model: Any, path: Path) -> Any:
    """`model`'s logits on two short sentences, tokenized by `path`'s tokenizer (EOS as pad
    for tokenizers without one)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["a fine film", "the battery was awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=ARCHITECTURES)
    parser.add_argument("out", type=Path)
    parser.add_argument("texts", type=Path, nargs="*", help="JSON Lines files to add words of")
    args = parser.parse_args(argv)
    build_tiny_model(args.arch, args.out)
    build_tiny_tokenizer(args.arch, args.out, args.texts)
    print(f"wrote a tiny random {args.arch} with its tokenizer to {args.out}")


if __name__ == "__main__":
    main()
