"""merge of an MPOE artifact (`moe`): a Mixtral (Llama family) or Switch Transformers (T5)
checkpoint that transformers loads and that computes what `load_model` computes, with experts
that differ and tokens spread over them; architectures and mixtures those classes cannot hold
are refused in one line, before anything is written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    T5Config,
    T5ForConditionalGeneration,
)

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest, write_manifest
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.methods.mpoe.state import expert_weight
from mposurgeon.models.moe_export import NEVER_DROP
from mposurgeon.models.probe import SAMPLE_SENTENCES
from mposurgeon.stages.merge import TOLERANCES
from tests.cli_runner import assert_one_line_error, run_cli

TRAIN = Path(__file__).resolve().parent.parent / "data" / "sentiment-train.jsonl"
ATOL, RTOL = TOLERANCES[torch.float32]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _perturbed(artifact: Path, out: Path, seed: int = 0) -> Path:
    """A copy of `artifact` whose experts' own cores get noise (30% of their spread) and whose
    routers are redrawn N(0, 1), so experts differ and tokens spread over them; its manifest's
    checksums are rewritten."""
    shutil.copytree(artifact, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(out / "model.safetensors")
    for key, t in tensors.items():
        if ".mpoe.experts." in key:
            tensors[key] = t + 0.3 * t.std() * torch.randn(t.shape, generator=generator)
        elif key.endswith(".mpoe_router.weight"):
            tensors[key] = torch.randn(t.shape, generator=generator)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_manifest(out, read_manifest(out))
    return out


def _ids(vocab: int, shape: tuple[int, int] = (3, 24), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _close(reference: torch.Tensor, other: torch.Tensor) -> bool:
    """Within merge's float32 verify tolerance (atol + rtol * max |reference|)."""
    tolerance = ATOL + RTOL * reference.abs().max().item()
    return (reference - other).abs().max().item() <= tolerance


# --- Llama -> Mixtral -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral(tiny_model_dir: Callable[[str], Path], tmp_path_factory) -> tuple[Path, Path]:
    """(the perturbed MPOE artifact of the tiny Llama, 4 experts top-2; its merged checkpoint)."""
    root = tmp_path_factory.mktemp("moe-llama")
    mposurgeon.moe(tiny_model_dir("llama"), output=root / "moe", experts=4, top_k=2)
    artifact = _perturbed(root / "moe", root / "perturbed")
    result = mposurgeon.merge(artifact, output=root / "merged", verify=True)
    assert result.architecture == "MixtralForCausalLM"
    assert result.comparison is not None and result.comparison.ok
    return artifact, root / "merged"


def test_llama_moe_merges_to_a_mixtral_that_computes_the_same_logits(
    tiny_model_dir: Callable[[str], Path], mixtral: tuple[Path, Path]
) -> None:
    artifact, merged = mixtral
    config = json.loads((merged / "config.json").read_text())
    base = json.loads((tiny_model_dir("llama") / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["router_jitter_noise"] == 0 and config["output_router_logits"] is False
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"):
        assert config[key] == base[key], key
    assert config["rope_parameters"] == base["rope_parameters"]
    assert config["rms_norm_eps"] == base["rms_norm_eps"]
    assert config["tie_word_embeddings"] is False

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = _ids(config["vocab_size"])
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
        reference = mposurgeon.load_model(artifact)(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
        before = dense(input_ids=ids).logits
    assert _close(reference, out.logits)
    assert (reference - before).abs().max() > 100 * ATOL  # the experts changed the model
    for logits in out.router_logits:  # (tokens, E) per layer: tokens use most experts
        assert len(torch.unique(logits.topk(2, dim=-1).indices)) >= 3


def test_mixtral_files_hold_each_experts_weights_and_the_router(
    tiny_model_dir: Callable[[str], Path], mixtral: tuple[Path, Path]
) -> None:
    artifact, merged = mixtral
    files, stored = _tensors(merged), _tensors(artifact)
    records = {
        n: r for n, r in read_manifest(artifact).modules.items() if isinstance(r, MPOERecord)
    }
    assert len(records) == 2 * 3
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    expected = {k for k in _tensors(tiny_model_dir("llama")) if ".mlp." not in k}
    for name, rec in records.items():
        layer, _, proj = name.partition(".mlp.")
        weights = []
        for e in range(4):
            key = f"{layer}.block_sparse_moe.experts.{e}.{names[proj]}.weight"
            assert torch.equal(files[key], expert_weight(rec, stored, e)), key
            weights.append(files[key])
            expected.add(key)
        assert all(not torch.equal(weights[0], w) for w in weights[1:])  # experts differ
        router = f"{layer}.block_sparse_moe.gate.weight"
        assert torch.equal(files[router], stored[f"{layer}.mlp.mpoe_router.weight"])
        expected.add(router)
    assert set(files) == expected  # nothing else: no cores, no mpoe names


def test_moe_of_a_decomposed_llama_merges_its_mpo_attention_densely(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    mposurgeon.decompose(tiny_model_dir("llama-tied"), output=tmp_path / "dec", layers="attention")
    mposurgeon.moe(tmp_path / "dec", output=tmp_path / "moe", experts=3, top_k=2)
    artifact = _perturbed(tmp_path / "moe", tmp_path / "perturbed")
    result = mposurgeon.merge(artifact, output=tmp_path / "merged", verify=True)
    assert result.merged_modules == 2 * (4 + 3)
    files = _tensors(tmp_path / "merged")
    assert "model.layers.1.self_attn.q_proj.weight" in files  # dense again
    assert "lm_head.weight" not in files  # still tied to the embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert model.config.tie_word_embeddings and model.config.num_local_experts == 3
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        reference = mposurgeon.load_model(artifact)(input_ids=ids).logits
        assert _close(reference, model(input_ids=ids).logits)


@pytest.mark.usefixtures("one_torch_thread")
def test_trained_llama_classifier_merges_to_a_mixtral_classifier(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_classifier_dir("llama")
    mposurgeon.moe(base, output=tmp_path / "moe", experts=3, top_k=1)
    trained = tmp_path / "trained"
    mposurgeon.train(
        tmp_path / "moe",
        output=trained,
        method="mpoe",
        data=TRAIN,
        task="classification",
        max_steps=4,
        batch_size=8,
        lr=1e-2,
    )
    result = mposurgeon.merge(trained, output=tmp_path / "merged", verify=True)
    assert result.architecture == "MixtralForSequenceClassification"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(model).__name__ == "MixtralForSequenceClassification"
    trained_config = json.loads((trained / "config.json").read_text())
    assert model.config.id2label == {int(k): v for k, v in trained_config["id2label"].items()}
    assert model.config.pad_token_id == trained_config["pad_token_id"] is not None
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = dict(tokenizer(SAMPLE_SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = mposurgeon.load_model(trained)(**batch).logits
        assert _close(reference, model(**batch).logits)
    expert = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    files = _tensors(tmp_path / "merged")
    assert not torch.equal(files[expert.format(0)], files[expert.format(1)])  # trained apart


# --- T5 -> Switch Transformers --------------------------------------------------------------


def test_t5_moe_merges_to_switch_transformers_that_computes_the_same_logits(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    mposurgeon.moe(tiny_model_dir("t5"), output=tmp_path / "moe", experts=4)
    artifact = _perturbed(tmp_path / "moe", tmp_path / "perturbed")
    result = mposurgeon.merge(artifact, output=tmp_path / "merged", verify=True)
    assert result.architecture == "SwitchTransformersForConditionalGeneration"

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "switch_transformers" and config["num_experts"] == 4
    assert config["encoder_sparse_step"] == config["decoder_sparse_step"] == 1  # every layer
    assert config["expert_capacity"] == NEVER_DROP and config["router_jitter_noise"] == 0
    assert config["dense_act_fn"] == "relu" and config["tie_word_embeddings"] is True

    files, stored = _tensors(tmp_path / "merged"), _tensors(artifact)
    assert not any("DenseReluDense" in k or ".mpoe" in k for k in files)
    ff = "decoder.block.1.layer.2"
    rec = read_manifest(artifact).modules[f"{ff}.DenseReluDense.wo"]
    assert isinstance(rec, MPOERecord)
    for e in range(4):
        key = f"{ff}.mlp.experts.expert_{e}.wo.weight"
        assert torch.equal(files[key], expert_weight(rec, stored, e))
    router = files[f"{ff}.mlp.router.classifier.weight"]
    assert torch.equal(router, stored[f"{ff}.DenseReluDense.mpoe_router.weight"])

    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert type(model).__name__ == "SwitchTransformersForConditionalGeneration"
    ids = _ids(config["vocab_size"], (3, 80))  # more tokens per sequence than HF's default capacity
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :20]}
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
        reference = mposurgeon.load_model(artifact)(**inputs).logits
        dense = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir("t5")).eval()
        before = dense(**inputs).logits
    assert _close(reference, out.logits)
    assert (reference - before).abs().max() > 100 * ATOL
    for logits in out.encoder_router_logits:  # (batch, seq, E) per layer
        assert len(torch.unique(logits.argmax(dim=-1))) >= 3


# --- refusals -------------------------------------------------------------------------------


def _gated_t5(out: Path) -> Path:
    """A tiny T5 v1.1-style model: gated-gelu feed-forward (wi_0, wi_1)."""
    config = T5Config(
        vocab_size=256,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out


REFUSALS: dict[str, tuple[str, dict[str, object], tuple[str, ...]]] = {
    # case: (tiny model, moe options, what the error line says)
    "bert": ("bert", {}, ("no mixture-of-experts class in transformers", "load_model")),
    "gated-t5": ("gated-t5", {}, ("gated feed-forward", "Switch Transformers")),
    "t5-top-2": ("t5", {"top_k": 2, "gate": "normalized"}, ("top-k 2", "top-1 expert")),
    "llama-switch-gate": ("llama", {"gate": "switch"}, ("switch gates", "Mixtral")),
    "llama-one-layer": (
        "llama",
        {"exclude_modules": r"model\.layers\.1\..*"},
        ("model.layers.1.mlp.", "dense feed-forward matrix", "every layer"),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_merge_refuses_a_mixture_no_moe_class_holds(
    case: str,
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arch, options, needles = REFUSALS[case]
    base = _gated_t5(tmp_path / "base") if arch == "gated-t5" else tiny_model_dir(arch)
    mposurgeon.moe(base, output=tmp_path / "moe", experts=3, **options)
    assert mposurgeon.load_model(tmp_path / "moe") is not None  # it runs as it is
    out = tmp_path / "merged"
    result = run_cli(capsys, "merge", tmp_path / "moe", "-o", out, "--verify")
    assert_one_line_error(result, 2, *needles)
    assert {p.name for p in tmp_path.iterdir()} <= {"base", "moe"}  # no output, no leftovers
