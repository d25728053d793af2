"""`train --method prefix-tuning`: trained keys and values in every attention module, through
transformers' attention interface: exact counts and budgets, the attention equals a hand
computation under every mask form, padding changes nothing, a causal LM generates the same with
and without its cache, the artifact runs through load_model and eval, merge refuses it, and a
model whose attention bypasses the interface (T5) is refused in one line."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods.prefix_tuning.config import PrefixTuningConfig
from mposurgeon.methods.prefix_tuning.method import prefix_attention
from mposurgeon.methods.registry import get_method
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


def test_minilm_counts_and_budgets(minilm_dir: Path) -> None:
    """6 attention modules x keys and values x 12 heads x 32 dims = 4,608 per virtual token."""
    for config, tokens in [
        (PrefixTuningConfig(), 20),
        (PrefixTuningConfig(num_virtual_tokens=3), 3),
        (PrefixTuningConfig(budget=5 * 4608 + 4607), 5),
    ]:
        model = seeded_classifier(minilm_dir)
        method = get_method(config)
        (record,) = method.prepare(model, {}, []).values()
        method.set_trainable(model)
        trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert trained == [
            "bert.embeddings.word_embeddings.prefix", "classifier.bias", "classifier.weight"
        ]  # fmt: skip
        assert record.params == tokens * 4608 == model.get_input_embeddings().prefix.numel()
        assert len(record.attention_modules) == 6  # type: ignore[attr-defined]


class _Attention(torch.nn.Module):
    def __init__(self, prefix: torch.Tensor, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal
        self.__dict__["_mposurgeon_prefix"] = lambda: prefix


@pytest.mark.parametrize("form", ["none", "none-causal", "bool", "float"])
def test_prefix_attention_equals_the_hand_computation(form: str) -> None:
    """softmax(q [Pk; k]^T / sqrt(d) + mask) [Pv; v], the prefix visible to every query."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, t, d, p = 2, 2, 4, 8, 3
    q, k, v = (torch.randn(batch, heads, t, d, generator=gen, dtype=torch.float64) for _ in "qkv")
    prefix = torch.randn(2, heads, p, d, generator=gen, dtype=torch.float64)
    visible = torch.ones(batch, 1, t, t, dtype=torch.bool)
    visible[1, :, :, 3] = False  # the second row's last token is padding
    if form == "none-causal":
        visible = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(batch, 1, t, t)
    elif form == "none":
        visible = torch.ones(batch, 1, t, t, dtype=torch.bool)
    mask = {
        "none": None,
        "none-causal": None,
        "bool": visible,
        "float": torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -1e9),
    }[form]
    module = _Attention(prefix, causal=form == "none-causal")
    out, _ = prefix_attention(module, q, k, v, mask, scaling=1 / math.sqrt(d))
    keys = torch.cat((prefix[0].expand(batch, -1, -1, -1), k), dim=2)
    values = torch.cat((prefix[1].expand(batch, -1, -1, -1), v), dim=2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)
    full = torch.cat((torch.ones(batch, 1, t, p, dtype=torch.bool), visible), dim=-1)
    expected = torch.softmax(scores.masked_fill(~full, float("-inf")), dim=-1) @ values
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_padding_changes_nothing_and_the_prefix_matters(
    arch: str, tiny_classifier_dir: Callable[[str], Path]
) -> None:
    """A row scored alone and padded in a batch with a longer one gives the same logits."""
    base = tiny_classifier_dir(arch)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = seeded_classifier(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        before = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    method = get_method(PrefixTuningConfig(num_virtual_tokens=3, prefix_init="random"))
    method.prepare(model, {}, [])
    model.eval()
    with torch.no_grad():
        alone = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
        batch = tokenizer(["a fine film", "the battery was awful and slow"], padding=True,
                          return_tensors="pt")  # fmt: skip
        padded = model(**batch).logits
    torch.testing.assert_close(padded[:1], alone, rtol=0, atol=1e-5)
    assert float((alone - before).abs().max()) > 1e-4


def test_a_causal_lm_generates_the_same_with_and_without_its_cache(
    tiny_classifier_dir: Callable[[str], Path],
) -> None:
    base = tiny_classifier_dir("llama")  # grouped-query attention: 2 key-value heads of 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    (record,) = get_method(PrefixTuningConfig(num_virtual_tokens=4)).prepare(model, {}, []).values()
    assert record.kv_heads == 2  # type: ignore[attr-defined]
    ids = torch.tensor([[1, 5, 9, 12]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_the_artifact_runs_evaluates_and_refuses_merge(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "prefix"
    result = mposurgeon.train(
        tiny_classifier_dir("bert"), output=out, method="prefix-tuning", num_virtual_tokens=4,
        data=TRAIN, eval_data=EVAL, max_steps=4, batch_size=16,
    )  # fmt: skip
    assert result.metrics["trainable_params"] - result.metrics["trainable_head"] == 2 * 2 * 4 * 32
    config = AutoConfig.from_pretrained(out)  # a plain config: the prefix attention is not saved
    assert config._attn_implementation != "mposurgeon_prefix"
    scores = mposurgeon.evaluate(out, data=EVAL).metrics
    assert scores["accuracy"] == (read_manifest(out).metrics or {})["eval_accuracy"]
    refused = run_cli(capsys, "merge", out, "-o", tmp_path / "m")
    assert_one_line_error(refused, 2, "no dense weight can hold")
    assert not (tmp_path / "m").exists()


def test_bloom_is_refused_before_any_work(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    result = run_cli(
        capsys, "train", tiny_classifier_dir("bloom"), "--method", "prefix-tuning", "--data",
        TRAIN, "-o", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(result, 2, "does not go through transformers' attention interface")
    assert not (tmp_path / "o").exists()
