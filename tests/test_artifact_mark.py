"""An artifact cannot pass for a plain checkpoint (issue 16, item 1): `from_pretrained` of an
artifact with transformed modules fails loudly through every `transformers` entry point, with a
message that says what to do; its config and tokenizer still load; a merged checkpoint loads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertModel,
)

import mposurgeon
from mposurgeon.artifact.config import ARTIFACT_MARK, MARK_KEPT
from mposurgeon.models.layers import MPOLinear

TRAIN = Path(__file__).resolve().parents[1] / "data" / "sentiment-train.jsonl"


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "load",
    [
        lambda p: AutoModel.from_pretrained(p),
        lambda p: AutoModelForSequenceClassification.from_pretrained(p),
        lambda p: BertModel.from_pretrained(p),
        lambda p: AutoModel.from_config(AutoConfig.from_pretrained(p)),
    ],
    ids=["AutoModel", "AutoModelForSequenceClassification", "BertModel", "from_config"],
)
def test_from_pretrained_of_an_artifact_fails_and_says_what_to_do(
    tiny_mpo: Path, load: Callable[[Path], object]
) -> None:
    with pytest.raises(ValueError) as caught:
        load(tiny_mpo)
    message = str(caught.value)
    assert "mposurgeon.load_model(PATH)" in message and "mposurgeon merge PATH" in message


def test_the_marked_artifact_still_reads_and_loads_with_mposurgeon(tiny_mpo: Path) -> None:
    assert _config(tiny_mpo)["attn_implementation"] == ARTIFACT_MARK
    assert AutoConfig.from_pretrained(tiny_mpo).model_type == "bert"
    assert AutoTokenizer.from_pretrained(tiny_mpo)("a test")["input_ids"]
    model = mposurgeon.load_model(tiny_mpo)
    assert any(isinstance(m, MPOLinear) for m in model.modules())
    assert model.config._attn_implementation != ARTIFACT_MARK
    assert not hasattr(model.config, MARK_KEPT)


def test_a_merged_checkpoint_loads_and_keeps_the_base_attention(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """A base config's own attention implementation is kept beside the mark, put back for
    `load_model` and in the merged config, which `from_pretrained` loads."""
    base = tmp_path / "base"
    shutil.copytree(tiny_classifier_dir("bert"), base)
    config = _config(base)
    config["attn_implementation"] = "eager"
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    artifact = mposurgeon.decompose(base, output=tmp_path / "mpo", layers=["FFN_1"]).output
    assert _config(artifact)[MARK_KEPT] == "eager"
    assert mposurgeon.load_model(artifact).config._attn_implementation == "eager"

    merged = mposurgeon.merge(artifact, output=tmp_path / "merged", verify=True).output
    assert _config(merged)["attn_implementation"] == "eager"
    assert MARK_KEPT not in _config(merged)
    dense = AutoModel.from_pretrained(merged)
    assert dense.config._attn_implementation == "eager"


def test_an_output_without_transformed_modules_stays_a_plain_checkpoint(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """`full` fine-tuning of a dense model writes dense weights only: transformers loads them
    right, so the config is not marked, and the trained artifact gives the same logits."""
    out = tmp_path / "full"
    mposurgeon.train(
        tiny_classifier_dir("bert"), output=out, method="full", data=TRAIN, max_steps=2
    )
    assert "attn_implementation" not in _config(out)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = mposurgeon.load_model(out)
    batch = {"input_ids": torch.tensor([[2, 5, 7, 3]])}
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours(**batch).logits)
