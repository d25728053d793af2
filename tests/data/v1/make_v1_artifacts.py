"""Make the version-1 artifacts of tests/data/v1 with the last mposurgeon that wrote format 1.

Run it from a checkout of commit 2755aee (the last version-1 writer), so that the package
imported is that checkout's (the current directory comes first on sys.path):

    git worktree add /tmp/v1src 2755aee
    cd /tmp/v1src && /path/to/venv/bin/python /path/to/tests/data/v1/make_v1_artifacts.py OUT

It builds, in /tmp/mposurgeon-v1-build (the paths the manifests record), a tiny random BERT
(hidden 32, 2 layers, seed 0) with a word-level tokenizer over the shipped sentiment data, then:

- `decompose/`: FFN_1 and attention decomposed into 3 cores (lossless);
- `train/`: `train --mode lightweight` of `decompose/`, 4 steps, with eval data (metrics hold
  `mode`, `mpo_lr`, `mpo_modules`, `eval_accuracy`);
- `select/`: `select --method magnitude --top-n 2 --split-num 2 --epochs 2` of the base
  model (a selection with a two-round schedule, round 0 chosen);

and copies them to OUT/decompose, OUT/train, OUT/select (replacing those directories only).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

BUILD = Path("/tmp/mposurgeon-v1-build")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_base(out: Path, data_dir: Path) -> None:
    """A tiny random BertModel and a word-level tokenizer over the data's words."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words: set[str] = set()
    for name in ("sentiment-train.jsonl", "sentiment-eval.jsonl"):
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            words |= set(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def main(target: Path) -> None:
    sys.path.insert(0, str(Path.cwd()))  # the checkout's mposurgeon, not an installed one
    import mposurgeon
    from mposurgeon.artifact.manifest import FORMAT_VERSION

    if FORMAT_VERSION != 1:
        sys.exit(f"{mposurgeon.__file__} writes format_version {FORMAT_VERSION}, not 1")
    print(f"mposurgeon {mposurgeon.__version__} from {mposurgeon.__file__}")
    data_dir = Path(mposurgeon.__file__).resolve().parent.parent / "data"
    shutil.rmtree(BUILD, ignore_errors=True)
    (BUILD / "data").mkdir(parents=True)
    for name in ("sentiment-train.jsonl", "sentiment-eval.jsonl"):
        shutil.copyfile(data_dir / name, BUILD / "data" / name)
    base = BUILD / "tiny-bert"
    build_base(base, BUILD / "data")

    dec = mposurgeon.decompose(
        base, output=BUILD / "decompose", layers=["FFN_1", "attention"], num_cores=3
    )
    mposurgeon.train(
        dec.output,
        output=BUILD / "train",
        data=BUILD / "data" / "sentiment-train.jsonl",
        eval_data=BUILD / "data" / "sentiment-eval.jsonl",
        mode="lightweight",
        max_steps=4,
        batch_size=8,
        max_length=32,
        seed=0,
    )
    mposurgeon.select(
        base,
        output=BUILD / "select",
        method="magnitude",
        top_n=2,
        split_num=2,
        epochs=2,
    )
    for name in ("decompose", "train", "select"):
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(BUILD / name, target / name)
    print(f"wrote decompose, train, select to {target}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(Path(sys.argv[1]).resolve())
