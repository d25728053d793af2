"""Weight groups, regex selection and tied weights on tiny models of every architecture."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHITECTURES
from safetensors import safe_open
from torch import nn

from mposurgeon.errors import UsageError
from mposurgeon.models.groups import (
    GROUP_PATTERNS,
    GROUPS,
    Target,
    attention_projection,
    candidate_modules,
    group_of,
    select_targets,
)
from mposurgeon.models.layout import ModelLayout, build_meta_model, describe_model

TinyDir = Callable[[str], Path]


@cache
def _load(path: Path) -> tuple[nn.Module, tuple[str, ...]]:
    """The meta model of a saved checkpoint and the tensor names its file holds."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = tuple(f.keys())
    config = transformers.AutoConfig.from_pretrained(path)
    return build_meta_model(config), keys


def _names(targets: list[Target]) -> list[str]:
    return [t.name for t in targets]


# arch -> group -> (count, some exact names that must be in the group); None: matches nothing.
EXPECTED: dict[str, dict[str, tuple[int, list[str]] | None]] = {
    "bert": {
        "FFN_1": (2, ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]),
        "FFN_2": (2, ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]),
        "attention": (
            8,
            ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.output.dense"],
        ),
        "embeddings": (1, ["embeddings.word_embeddings"]),
        "pooler": (1, ["pooler.dense"]),
        "lm_head": None,
    },
    "roberta": {
        "FFN_1": (2, ["roberta.encoder.layer.0.intermediate.dense"]),
        "FFN_2": (2, ["roberta.encoder.layer.1.output.dense"]),
        "attention": (8, ["roberta.encoder.layer.0.attention.self.value"]),
        "embeddings": (1, ["roberta.embeddings.word_embeddings"]),
        "pooler": None,  # RobertaForMaskedLM has no pooler
        "lm_head": (1, ["roberta.embeddings.word_embeddings"]),  # tied decoder
    },
    "albert": {  # one shared layer group serves every layer
        "FFN_1": (1, ["encoder.albert_layer_groups.0.albert_layers.0.ffn"]),
        "FFN_2": (1, ["encoder.albert_layer_groups.0.albert_layers.0.ffn_output"]),
        "attention": (4, ["encoder.albert_layer_groups.0.albert_layers.0.attention.dense"]),
        "embeddings": (1, ["embeddings.word_embeddings"]),
        "pooler": (1, ["pooler"]),
        "lm_head": None,
    },
    "distilbert": {
        "FFN_1": (2, ["distilbert.transformer.layer.0.ffn.lin1"]),
        "FFN_2": (2, ["distilbert.transformer.layer.1.ffn.lin2"]),
        "attention": (8, ["distilbert.transformer.layer.0.attention.out_lin"]),
        "embeddings": (1, ["distilbert.embeddings.word_embeddings"]),
        "pooler": None,
        "lm_head": (1, ["distilbert.embeddings.word_embeddings"]),
    },
    "bart": {
        "FFN_1": (4, ["model.encoder.layers.0.fc1", "model.decoder.layers.1.fc1"]),
        "FFN_2": (4, ["model.encoder.layers.1.fc2", "model.decoder.layers.0.fc2"]),
        "attention": (
            24,
            [
                "model.encoder.layers.0.self_attn.q_proj",
                "model.decoder.layers.1.encoder_attn.out_proj",
            ],
        ),
        "embeddings": (1, ["model.shared"]),
        "pooler": None,
        "lm_head": (1, ["model.shared"]),
    },
    "t5": {
        "FFN_1": (4, ["encoder.block.0.layer.1.DenseReluDense.wi"]),
        "FFN_2": (4, ["decoder.block.1.layer.2.DenseReluDense.wo"]),
        "attention": (
            24,
            [
                "encoder.block.0.layer.0.SelfAttention.q",
                "decoder.block.1.layer.1.EncDecAttention.o",
            ],
        ),
        "embeddings": (1, ["shared"]),
        "pooler": None,
        "lm_head": (1, ["shared"]),
    },
    "gpt2": {
        "FFN_1": (2, ["transformer.h.0.mlp.c_fc"]),
        "FFN_2": (2, ["transformer.h.1.mlp.c_proj"]),
        "attention": (4, ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]),
        "embeddings": (1, ["transformer.wte"]),
        "pooler": None,
        "lm_head": (1, ["transformer.wte"]),
    },
    "bloom": {
        "FFN_1": (2, ["transformer.h.0.mlp.dense_h_to_4h"]),
        "FFN_2": (2, ["transformer.h.1.mlp.dense_4h_to_h"]),
        "attention": (
            4,
            [
                "transformer.h.0.self_attention.query_key_value",
                "transformer.h.1.self_attention.dense",
            ],
        ),
        "embeddings": (1, ["transformer.word_embeddings"]),
        "pooler": None,
        "lm_head": (1, ["transformer.word_embeddings"]),
    },
    "llama": {
        "FFN_1": (4, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]),
        "FFN_2": (2, ["model.layers.1.mlp.down_proj"]),
        "attention": (8, ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]),
        "embeddings": (1, ["model.embed_tokens"]),
        "pooler": None,
        "lm_head": (1, ["lm_head"]),
    },
    "llama-tied": {
        "FFN_1": (4, ["model.layers.1.mlp.up_proj"]),
        "FFN_2": (2, ["model.layers.0.mlp.down_proj"]),
        "attention": (8, ["model.layers.0.self_attn.q_proj"]),
        "embeddings": (1, ["model.embed_tokens"]),
        "pooler": None,
        "lm_head": (1, ["model.embed_tokens"]),
    },
}

# arch -> (the Target the files hold, the tied names the files do not hold)
TIED: dict[str, tuple[str, tuple[str, ...]]] = {
    "roberta": ("roberta.embeddings.word_embeddings", ("lm_head.decoder.weight",)),
    "distilbert": ("distilbert.embeddings.word_embeddings", ("vocab_projector.weight",)),
    "bart": (
        "model.shared",
        (
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
            "lm_head.weight",
        ),
    ),
    "t5": (
        "shared",
        ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
    ),
    "gpt2": ("transformer.wte", ("lm_head.weight",)),
    "bloom": ("transformer.word_embeddings", ("lm_head.weight",)),
    "llama-tied": ("model.embed_tokens", ("lm_head.weight",)),
}


def test_expected_tables_cover_every_architecture() -> None:
    assert set(EXPECTED) == set(ARCHITECTURES)
    assert all(set(groups) == set(GROUPS) for groups in EXPECTED.values())
    assert all(set(table) == set(GROUPS) for table in GROUP_PATTERNS.values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_group_counts_and_names(arch: str, tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir(arch))
    for group, expected in EXPECTED[arch].items():
        if expected is None:
            with pytest.raises(UsageError, match=f"group '{group}' matches no module"):
                select_targets(model, keys, layers=[group])
            continue
        count, names = expected
        targets = select_targets(model, keys, layers=[group])
        assert len(targets) == count, (group, _names(targets))
        assert set(names) <= set(_names(targets)), (group, _names(targets))
        assert all(t.group == group for t in targets)
        assert all(t.weight_key == t.name + ".weight" and t.weight_key in keys for t in targets)
        for target in targets:
            assert group_of(model, target.name) in (group, "embeddings")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_targets_are_module_ordered_and_unique(arch: str, tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir(arch))
    groups = [g for g, e in EXPECTED[arch].items() if e is not None]
    targets = select_targets(model, keys, layers=groups)
    assert len(targets) == len({t.weight_key for t in targets})
    chosen = {t.weight_key for t in targets}
    order = [t.weight_key for t in candidate_modules(model, keys)]
    assert [t.weight_key for t in targets] == [k for k in order if k in chosen]
    # the union of groups is the union of the single-group selections
    singles = {t.weight_key for g in groups for t in select_targets(model, keys, layers=[g])}
    assert {t.weight_key for t in targets} == singles


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_attention_output_dense_never_in_ffn2(arch: str, tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir(arch))
    ffn2 = _names(select_targets(model, keys, layers=["FFN_2"]))
    attention = _names(select_targets(model, keys, layers=["attention"]))
    assert not any("attention" in name for name in ffn2)
    assert sum(name.endswith("attention.output.dense") for name in attention) == 2
    assert group_of(model, "encoder.layer.0.attention.output.dense") == "attention"
    assert group_of(model, "encoder.layer.0.output.dense") == "FFN_2"


def test_shapes_bias_and_matrix_view(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    by_name = {t.name: t for t in candidate_modules(model, keys)}
    ffn1 = by_name["encoder.layer.0.intermediate.dense"]
    assert (ffn1.kind, ffn1.shape, ffn1.out_dim, ffn1.in_dim) == ("linear", (64, 32), 64, 32)
    assert ffn1.bias_key == "encoder.layer.0.intermediate.dense.bias"
    emb = by_name["embeddings.word_embeddings"]
    assert (emb.kind, emb.shape, emb.out_dim, emb.in_dim, emb.bias_key) == (
        "embedding",
        (1003, 32),
        1003,
        32,
        None,
    )
    model, keys = _load(tiny_model_dir("llama"))
    k_proj = next(
        t for t in candidate_modules(model, keys) if t.name.endswith("0.self_attn.k_proj")
    )
    assert (k_proj.shape, k_proj.bias_key) == ((16, 32), None)  # grouped-query attention


def test_gpt2_conv1d_is_transposed(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("gpt2"))
    targets = select_targets(model, keys, layers=["FFN_1", "FFN_2", "attention"])
    assert {t.kind for t in targets} == {"conv1d"}
    by_name = {t.name: t for t in targets}
    c_fc = by_name["transformer.h.0.mlp.c_fc"]
    assert c_fc.shape == (32, 128) and (c_fc.out_dim, c_fc.in_dim) == (128, 32)
    c_proj = by_name["transformer.h.0.mlp.c_proj"]
    assert c_proj.shape == (128, 32) and (c_proj.out_dim, c_proj.in_dim) == (32, 128)
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.out_dim, c_attn.in_dim) == (96, 32)
    assert c_attn.bias_key == "transformer.h.0.attn.c_attn.bias"


@pytest.mark.parametrize("arch", sorted(TIED))
def test_tied_weights(arch: str, tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir(arch))
    holder, tied = TIED[arch]
    candidates = candidate_modules(model, keys)
    by_name = {t.name: t for t in candidates}
    assert by_name[holder].tied_keys == tied
    assert not set(tied) & set(keys)
    # a tied module is not listed a second time
    assert not {k.removesuffix(".weight") for k in tied} & set(by_name)
    assert sum(bool(t.tied_keys) for t in candidates) == 1
    (embedding,) = select_targets(model, keys, layers=["embeddings"])
    (head,) = select_targets(model, keys, layers=["lm_head"])
    assert embedding.weight_key == head.weight_key == holder + ".weight"
    assert head.group == "lm_head"
    (both,) = select_targets(model, keys, layers=["lm_head", "embeddings"])
    assert both.group == "embeddings"


def test_untied_llama_head_is_its_own_target(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("llama"))
    assert "lm_head.weight" in keys
    (head,) = select_targets(model, keys, layers=["lm_head"])
    (embedding,) = select_targets(model, keys, layers=["embeddings"])
    assert (head.name, head.kind, head.shape, head.tied_keys) == (
        "lm_head",
        "linear",
        (320, 32),
        (),
    )
    assert (embedding.name, embedding.tied_keys) == ("model.embed_tokens", ())


def test_head_in_files_wins_over_declared_tie(tiny_model_dir: TinyDir) -> None:
    """flan-T5: transformers v5 always declares T5's head tied, but the files hold lm_head."""
    model, keys = _load(tiny_model_dir("t5"))
    keys = (*keys, "lm_head.weight")
    (head,) = select_targets(model, keys, layers=["lm_head"])
    assert (head.name, head.kind, head.tied_keys) == ("lm_head", "linear", ())
    (shared,) = select_targets(model, keys, layers=["embeddings"])
    assert shared.tied_keys == ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def test_file_keys_without_base_model_prefix(tiny_model_dir: TinyDir) -> None:
    """Hub GPT-2 files hold `h.0...` and `wte.weight` although GPT2LMHeadModel has `transformer.`"""
    model, keys = _load(tiny_model_dir("gpt2"))
    stripped = [k.removeprefix("transformer.") for k in keys]
    targets = select_targets(model, stripped, layers=["FFN_1", "embeddings"])
    assert _names(targets) == ["wte", "h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    assert targets[0].tied_keys == ("lm_head.weight",)
    assert targets[1].bias_key == "h.0.mlp.c_fc.bias"
    assert group_of(model, "h.0.mlp.c_fc") == "FFN_1"


def test_file_keys_with_base_model_prefix(tiny_model_dir: TinyDir) -> None:
    """Files saved from BertForMaskedLM (`bert.` keys) read with a BertModel config."""
    model, keys = _load(tiny_model_dir("bert"))
    prefixed = ["bert." + k for k in keys]
    targets = select_targets(model, prefixed, layers=["FFN_1", "pooler"])
    assert _names(targets) == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.pooler.dense",
    ]
    assert targets[2].bias_key == "bert.pooler.dense.bias"


def test_target_modules_is_a_full_match(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    with pytest.raises(UsageError) as err:
        select_targets(model, keys, target_modules="dense")
    message = str(err.value)
    assert "\n" not in message
    assert "encoder.layer.*.intermediate.dense" in message and "pooler.dense" in message
    targets = select_targets(model, keys, target_modules=r".*\.dense")
    assert len(targets) == 2 * 3 + 1  # attention.output, intermediate, output per layer + pooler
    assert all(t.group is None for t in targets)
    (one,) = select_targets(model, keys, target_modules=r"encoder\.layer\.1\.intermediate\.dense")
    assert one.name == "encoder.layer.1.intermediate.dense"


def test_union_of_groups_and_regex(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    targets = select_targets(model, keys, layers=["FFN_1"], target_modules=r"pooler\.dense")
    assert [(t.name, t.group) for t in targets] == [
        ("encoder.layer.0.intermediate.dense", "FFN_1"),
        ("encoder.layer.1.intermediate.dense", "FFN_1"),
        ("pooler.dense", None),
    ]
    # a comma list and any case work as group names
    same = select_targets(model, keys, layers="ffn_1, FFN_2")
    assert len(same) == 4


def test_regex_sees_tied_names(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("gpt2"))
    (head,) = select_targets(model, keys, target_modules="lm_head")
    assert head.name == "transformer.wte"
    with pytest.raises(UsageError, match="select no module"):
        select_targets(model, keys, layers=["embeddings"], exclude_modules="lm_head")


def test_exclude_modules(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    targets = select_targets(
        model, keys, layers=["FFN_1", "attention"], exclude_modules=r"encoder\.layer\.0\..*"
    )
    assert len(targets) == 5
    assert all(t.name.startswith("encoder.layer.1.") for t in targets)
    # exclude is a full match too: a bare "query" excludes nothing
    assert len(select_targets(model, keys, layers=["attention"], exclude_modules="query")) == 8
    with pytest.raises(UsageError, match="select no module"):
        select_targets(model, keys, layers=["FFN_1"], exclude_modules=".*")


def test_unknown_group_lists_valid_groups(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    with pytest.raises(UsageError) as err:
        select_targets(model, keys, layers=["FFN_1", "mlp"])
    assert "'mlp'" in str(err.value)
    assert all(group in str(err.value) for group in GROUPS)


def test_empty_group_lists_modules_compactly(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    with pytest.raises(UsageError) as err:
        select_targets(model, keys, layers=["lm_head"])
    message = str(err.value)
    assert "group 'lm_head' matches no module of this BertModel" in message
    assert "encoder.layer.*.attention.self.query" in message
    assert "encoder.layer.0." not in message and "\n" not in message
    model, keys = _load(tiny_model_dir("t5"))  # 19 distinct names: the list is capped
    with pytest.raises(UsageError, match=r"\.\.\. \(\d+ more\)"):
        select_targets(model, keys, layers=["pooler"])


def test_bad_regex_and_empty_request(tiny_model_dir: TinyDir) -> None:
    model, keys = _load(tiny_model_dir("bert"))
    with pytest.raises(UsageError, match="invalid target_modules regex"):
        select_targets(model, keys, target_modules="(unclosed")
    with pytest.raises(UsageError, match="invalid exclude_modules regex"):
        select_targets(model, keys, layers=["FFN_1"], exclude_modules="[")
    with pytest.raises(UsageError, match="nothing to select"):
        select_targets(model, keys)


def test_attention_projections() -> None:
    assert attention_projection("bert", "encoder.layer.3.attention.self.query") == "q"
    assert attention_projection("bert", "bert.encoder.layer.3.attention.self.key.weight") == "k"
    assert attention_projection("roberta", "roberta.encoder.layer.0.attention.output.dense") == "o"
    assert attention_projection("bert", "encoder.layer.0.output.dense") is None
    assert attention_projection("t5", "decoder.block.1.layer.1.EncDecAttention.v") == "v"
    assert attention_projection("gpt2", "transformer.h.0.attn.c_attn") == "qkv"
    assert attention_projection("gpt2", "h.0.attn.c_proj") == "o"
    assert attention_projection("bloom", "transformer.h.0.self_attention.query_key_value") == "qkv"
    assert attention_projection("llama", "model.layers.0.self_attn.o_proj") == "o"
    assert attention_projection("mistral", "model.layers.0.self_attn.q_proj") == "q"
    assert attention_projection("bart", "model.decoder.layers.0.encoder_attn.out_proj") == "o"
    assert attention_projection("distilbert", "transformer.layer.0.attention.v_lin") == "v"
    assert attention_projection("albert", "pooler") is None
    assert attention_projection("unknown-type", "q") is None


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_llama_family_aliases(model_type: str) -> None:
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = build_meta_model(config)
    keys = [name for name, _ in model.named_parameters()]
    counts = {g: len(select_targets(model, keys, layers=[g])) for g in ("FFN_1", "FFN_2")}
    assert counts == {"FFN_1": 4, "FFN_2": 2}
    assert len(select_targets(model, keys, layers=["attention"])) == 8


def test_minilm_real_checkpoint(minilm_dir: Path) -> None:
    model, keys = _load(minilm_dir)
    assert type(model).__name__ == "BertModel"
    targets = select_targets(model, keys, layers=["FFN_1", "FFN_2", "attention"])
    assert len(targets) == 36
    shapes = {
        g: {t.shape for t in targets if t.group == g} for g in ("FFN_1", "FFN_2", "attention")
    }
    assert shapes == {"FFN_1": {(1536, 384)}, "FFN_2": {(384, 1536)}, "attention": {(384, 384)}}
    assert sum(t.group == "attention" for t in targets) == 24
    assert targets[0].name == "encoder.layer.0.attention.self.query"
    assert all(t.bias_key in keys for t in targets)
    (embedding,) = select_targets(model, keys, layers=["embeddings"])
    assert (embedding.name, embedding.shape) == ("embeddings.word_embeddings", (30522, 384))


def test_build_meta_model_allocates_nothing(minilm_dir: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(minilm_dir)
    model = build_meta_model(config)
    assert type(model).__name__ == "BertModel"
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in model.parameters())
    assert sum(t.numel() for t in model.parameters()) > 20_000_000
    real = [t for t in tensors if t.device.type != "meta"]
    assert sum(t.numel() for t in real) < 10_000  # at most tiny index buffers


def test_build_meta_model_falls_back_to_automodel() -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    config.architectures = ["NotAModelClassAnywhere"]
    model = build_meta_model(config)
    assert isinstance(model, transformers.BertModel)
    assert next(model.parameters()).device == torch.device("meta")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_round_trip_selects_the_same_targets(arch: str, tiny_model_dir: TinyDir) -> None:
    """A layout read back from its JSON form selects exactly what the model itself selects."""
    model, keys = _load(tiny_model_dir(arch))
    layout = describe_model(model)
    again = ModelLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert candidate_modules(again, keys) == candidate_modules(model, keys)
    groups = [g for g, e in EXPECTED[arch].items() if e is not None]
    assert select_targets(again, keys, layers=groups) == select_targets(model, keys, layers=groups)
    for target in candidate_modules(model, keys):
        assert group_of(again, target.name) == group_of(model, target.name)


def test_layout_records_ties_and_kinds(tiny_model_dir: TinyDir) -> None:
    model, _ = _load(tiny_model_dir("gpt2"))
    layout = describe_model(model)
    assert layout.class_name == type(model).__name__ and layout.prefix == "transformer"
    assert ("transformer.wte.weight", "lm_head.weight") in layout.tie_classes
    kinds = {m.name: m.kind for m in layout.modules}
    assert kinds["transformer.h.0.mlp.c_fc"] == "conv1d"
    assert kinds["transformer.wte"] == "embedding"


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d | {"format": 99},
        lambda d: {k: v for k, v in d.items() if k != "modules"},
        lambda d: d | {"modules": [["x", "lstm", [2, 2], False]]},
        lambda d: d | {"modules": [["x", "linear", [2], False]]},
        lambda d: [],
    ],
)
def test_layout_from_dict_rejects_malformed(damage: Callable, tiny_model_dir: TinyDir) -> None:
    layout = describe_model(_load(tiny_model_dir("bert"))[0])
    with pytest.raises(ValueError):
        ModelLayout.from_dict(damage(layout.to_dict()))
