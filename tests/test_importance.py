"""training/importance.py: Fisher scores (global clipping), weight patterns, top-N choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from mposurgeon.models.layers import MPOLinear
from mposurgeon.models.surgery import MPOModuleState, install_mpo_layers
from mposurgeon.mpo.decomposition import decompose
from mposurgeon.mpo.shapes import plan_shape
from mposurgeon.training.importance import choose_top_n, fisher_scores, weight_pattern

# --- weight patterns and top-N ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "group", "name", "pattern"),
    [
        ("bert", "FFN_1", "encoder.layer.3.intermediate.dense", "FFN_1"),
        ("bert", "FFN_2", "encoder.layer.3.output.dense", "FFN_2"),
        ("bert", "attention", "encoder.layer.3.attention.output.dense", "attention.o"),
        ("bert", "attention", "bert.encoder.layer.3.attention.self.query", "attention.q"),
        ("bert", "attention", "encoder.layer.0.attention.self.key.weight", "attention.k"),
        ("bert", "attention", "encoder.layer.0.attention.self.value", "attention.v"),
        ("gpt2", "attention", "h.1.attn.c_attn", "attention.qkv"),
        ("gpt2", "attention", "transformer.h.1.attn.c_proj", "attention.o"),
        ("bloom", "attention", "h.0.self_attention.query_key_value", "attention.qkv"),
        ("llama", "FFN_1", "model.layers.0.mlp.gate_proj", "FFN_1.gate"),
        ("llama", "FFN_1", "model.layers.0.mlp.up_proj", "FFN_1.up"),
        ("t5", "FFN_1", "encoder.block.0.layer.1.DenseReluDense.wi", "FFN_1"),
        ("t5", "FFN_1", "encoder.block.0.layer.1.DenseReluDense.wi_1", "FFN_1.up"),
        ("bert", "embeddings", "embeddings.word_embeddings", None),
        ("bert", None, "pooler.dense", None),
    ],
)
def test_weight_pattern(model_type: str, group: str | None, name: str, pattern: str | None) -> None:
    assert weight_pattern(model_type, group, name) == pattern


def test_choose_top_n_per_pattern_with_ties_and_exclusions() -> None:
    scores = {"a1": 3.0, "a2": 1.0, "a3": 3.0, "b1": 0.5, "b2": 2.0, "c1": 9.0}
    patterns = {"a1": "FFN_1", "a2": "FFN_1", "a3": "FFN_1", "b1": "FFN_2", "b2": "FFN_2"}
    # c1 has no pattern: never chosen; the a1/a3 tie goes to the name that sorts first.
    assert choose_top_n(scores, patterns, 1) == ["a1", "b2"]
    assert choose_top_n(scores, patterns.get, 2) == ["a1", "a3", "b2", "b1"]
    assert choose_top_n(scores, patterns, 1, exclude={"a1", "b2"}) == ["a3", "b1"]
    assert choose_top_n(scores, patterns, 0) == []
    assert choose_top_n(scores, patterns, 5) == ["a1", "a3", "a2", "b2", "b1"]
    with pytest.raises(ValueError):
        choose_top_n(scores, patterns, -1)


# --- Fisher scores ----------------------------------------------------------------------------

LINEARS = [
    f"bert.encoder.layer.{i}.{m}"
    for i in range(2)
    for m in ("attention.self.query", "attention.self.value", "intermediate.dense")
]


def _tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def _batches(
    n: int, seed: int = 1, size: int = 4, length: int = 12
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 100, (size, length), generator=g),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=g),
        }
        for _ in range(n)
    ]


class _ScaledLoss(nn.Module):
    """The same model, its loss multiplied by `factor` (gradients scale by `factor` too)."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, **batch: torch.Tensor) -> object:
        out = self.inner(**batch)
        out.loss = out.loss * self.factor
        return out


def _per_matrix_clipped(
    model: nn.Module, batches: list[dict], names: list[str], max_norm: float
) -> list[float]:
    """What the research code does: clip each matrix's gradient on its own."""
    totals = [0.0] * len(names)
    model.eval()
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for i, name in enumerate(names):
            weight = model.get_submodule(name).weight
            torch.nn.utils.clip_grad_norm_([weight], max_norm)
            totals[i] += float(weight.grad.double().square().mean())
    model.zero_grad()
    return totals


def test_fisher_clipping_is_global_so_loss_scale_changes_no_ranking() -> None:
    model, batches = _tiny_classifier(), _batches(3)
    clip = 0.1  # below every batch's total gradient norm (0.2 to 0.6), so clipping is active
    plain = fisher_scores(model, batches, LINEARS, max_grad_norm=clip)
    scaled = fisher_scores(
        _ScaledLoss(model, 1e6), batches, [f"inner.{n}" for n in LINEARS], max_grad_norm=clip
    )
    scaled = {n.removeprefix("inner."): s for n, s in scaled.items()}
    # Global clipping: x1e6 gradients are clipped back to the same directions and total norm.
    assert sorted(LINEARS, key=plain.__getitem__) == sorted(LINEARS, key=scaled.__getitem__)
    for name in LINEARS:
        assert scaled[name] == pytest.approx(plain[name], rel=1e-4)
    # The scores separate matrices of the same shape (a spread of more than 2x) ...
    same_shape = [n for n in LINEARS if "attention" in n]
    assert max(plain[n] for n in same_shape) > 2 * min(plain[n] for n in same_shape)
    # ... where per-matrix clipping (x1e6 puts every matrix above the clip) flattens them all.
    inner = [f"inner.{n}" for n in same_shape]
    flat = _per_matrix_clipped(_ScaledLoss(model, 1e6), batches, inner, clip)
    assert max(flat) == pytest.approx(min(flat), rel=1e-6)


def test_fisher_without_clipping_scales_with_the_loss_squared() -> None:
    model, batches = _tiny_classifier(), _batches(2)
    plain = fisher_scores(model, batches, LINEARS, max_grad_norm=None)
    scaled = fisher_scores(
        _ScaledLoss(model, 10.0), batches, [f"inner.{n}" for n in LINEARS], max_grad_norm=None
    )
    for name in LINEARS:
        assert scaled[f"inner.{name}"] == pytest.approx(100 * plain[name], rel=1e-4)


def test_fisher_is_deterministic_and_independent_of_batch_order() -> None:
    model, batches = _tiny_classifier(), _batches(4)
    first = fisher_scores(model, batches, LINEARS)
    assert fisher_scores(model, batches, LINEARS) == first
    # zero_grad between batches and a per-batch clip: the sum does not depend on the order.
    reverse = fisher_scores(model, batches[::-1], LINEARS)
    for name in LINEARS:
        assert reverse[name] == pytest.approx(first[name], rel=1e-6)
    # A different sample of the data changes the scores.
    other = fisher_scores(model, _batches(4, seed=7), LINEARS)
    assert all(other[n] != first[n] for n in LINEARS)


def test_fisher_max_batches_and_mean_over_batches() -> None:
    model, batches = _tiny_classifier(), _batches(3)
    one = fisher_scores(model, batches, LINEARS, max_batches=1)
    assert one == fisher_scores(model, batches[:1], LINEARS)
    each = [fisher_scores(model, [b], LINEARS) for b in batches]
    both = fisher_scores(model, iter(batches), LINEARS)
    for name in LINEARS:
        assert both[name] == pytest.approx(sum(e[name] for e in each) / 3, rel=1e-9)


def test_fisher_restores_modes_flags_and_grads() -> None:
    model = _tiny_classifier()
    model.train()
    model.bert.embeddings.eval()
    frozen = model.bert.encoder.layer[0].attention.self.query.weight
    frozen.requires_grad_(False)
    marker = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = marker
    scores = fisher_scores(model, _batches(2), LINEARS)
    assert scores[LINEARS[0]] > 0  # a frozen matrix is still scored
    assert model.training and not model.bert.embeddings.training
    assert model.bert.encoder.training
    assert not frozen.requires_grad and frozen.grad is None
    assert model.classifier.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")


def test_fisher_scores_an_mpo_layer_by_its_dense_gradient() -> None:
    dense_model, batches = _tiny_classifier(), _batches(2)
    mpo_model = _tiny_classifier()
    name = "bert.encoder.layer.1.intermediate.dense"
    weight = mpo_model.get_submodule(name).weight.detach()
    shape = plan_shape(64, 32, 3)
    cores = decompose(weight.double(), shape).cores
    install_mpo_layers(
        mpo_model.double(), [MPOModuleState(name=name, kind="linear", shape=shape, cores=cores)]
    )
    assert isinstance(mpo_model.get_submodule(name), MPOLinear)
    dense_model.double()
    batches64 = [{k: v for k, v in b.items()} for b in batches]
    expected = fisher_scores(dense_model, batches64, [name], max_grad_norm=None)
    got = fisher_scores(mpo_model, batches64, [name], max_grad_norm=None)
    assert got[name] == pytest.approx(expected[name], rel=1e-8)


def test_fisher_rejects_modules_without_a_weight() -> None:
    with pytest.raises(ValueError, match="no weight"):
        fisher_scores(_tiny_classifier(), _batches(1), ["bert.encoder.layer.0"])
    with pytest.raises(ValueError, match="no batches"):
        fisher_scores(_tiny_classifier(), [], LINEARS)
