"""`train --method ia3` (through peft): exact parameter counts, the model at initialization is
the base model, merge scales the weight (and an output scaling's bias), load_model runs the
artifact, GPT-2's Conv1D merges transposed."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods.base import head_parameter_names
from mposurgeon.methods.ia3.config import Ia3Config
from mposurgeon.methods.registry import get_method
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import sample_logits, seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


def test_minilm_ia3_defaults_follow_peft_and_start_as_the_base_model(minilm_dir: Path) -> None:
    """PEFT's BERT targets: key and value scale their output (384 each), both output
    projections their input (attention output 384, FFN output 1536): 6 x (384 x 3 + 1536)."""
    model = seeded_classifier(minilm_dir)
    base = sample_logits(model, minilm_dir)
    method = get_method(Ia3Config())
    records = method.prepare(model, {}, [])
    method.set_trainable(model)
    head = head_parameter_names(model)
    trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    in_head = sum(p.numel() for n, p in model.named_parameters() if n in head)
    assert trained - in_head == 6 * (384 * 3 + 1536) == 16_128
    assert sum(r.params for r in records.values()) == 16_128
    feedforward = {re.sub(r".*layer\.\d+\.", "", n) for n, r in records.items() if r.feedforward}
    assert feedforward == {"attention.output.dense", "output.dense"}
    assert torch.equal(sample_logits(model.eval(), minilm_dir), base)


@pytest.fixture(scope="module")
def trained(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ia3") / "bert"
    mposurgeon.train(
        tiny_classifier_dir("bert"), output=out, method="ia3", layers="attention,FFN_2",
        data=TRAIN, eval_data=EVAL, max_steps=6, batch_size=16, lr=5e-2,
    )  # fmt: skip
    return out


def test_merge_scales_weights_and_output_biases(trained: Path, tmp_path: Path) -> None:
    manifest = read_manifest(trained)
    assert len(manifest.modules) == 10  # 2 layers x (q, k, v, attention output, FFN output)
    tensors = load_file(trained / "model.safetensors")
    assert not any(".base_layer." in k or ".default" in k for k in tensors)
    merged = mposurgeon.merge(trained, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    dense = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("ia3" in k for k in dense)
    kinds = {r.feedforward for r in manifest.modules.values()}
    assert kinds == {True, False}
    for name, rec in manifest.modules.items():
        scale = tensors[f"{name}.ia3_l"].double()
        assert float((scale - 1).abs().max()) > 0  # trained off ones
        weight, bias = tensors[f"{name}.weight"].double(), tensors[f"{name}.bias"].double()
        if rec.feedforward:  # type: ignore[attr-defined]
            assert scale.shape == (1, weight.shape[1])
            expected_w, expected_b = weight * scale, bias
        else:
            assert scale.shape == (weight.shape[0], 1)
            expected_w, expected_b = weight * scale, bias * scale.flatten()
        torch.testing.assert_close(dense[f"{name}.weight"].double(), expected_w, atol=1e-7, rtol=0)
        torch.testing.assert_close(dense[f"{name}.bias"].double(), expected_b, atol=1e-7, rtol=0)
    a_scores = mposurgeon.evaluate(trained, data=EVAL).metrics
    m_scores = mposurgeon.evaluate(tmp_path / "merged", data=EVAL).metrics
    assert a_scores["accuracy"] == m_scores["accuracy"]
    assert a_scores["loss"] == pytest.approx(m_scores["loss"], abs=1e-5)


def test_gpt2_conv1d_layers_merge_transposed(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "gpt2"
    mposurgeon.train(
        tiny_classifier_dir("gpt2"), output=out, method="ia3", data=TRAIN, max_steps=3,
        batch_size=16, lr=5e-2,
    )  # fmt: skip
    records = read_manifest(out).modules
    assert records and all(r.kind == "conv1d" for r in records.values())
    assert {r.feedforward for r in records.values()} == {True, False}  # type: ignore[attr-defined]
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok


def test_ia3_takes_no_budget_and_no_rank(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    base = tiny_classifier_dir("bert")
    for flags, message in [
        (["--budget", "100"], "--budget is not an option of method ia3"),
        (["--lora-r", "4"], "--lora-r is not an option of method ia3"),
        (["--layers", "embeddings"], "ia3 adapts Linear and Conv1D layers"),
    ]:
        result = run_cli(
            capsys, "train", base, "--method", "ia3", "--data", TRAIN, "-o", tmp_path / "o",
            *flags,
        )  # fmt: skip
        assert_one_line_error(result, 2, message)
        assert not (tmp_path / "o").exists()


def test_export_peft_round_trip_gives_the_artifacts_logits(
    trained: Path, tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    import json

    import peft

    out = tmp_path / "adapter"
    result = run_cli(capsys, "export-peft", trained, "-o", out, "--json")
    assert result.code == 0, result
    summary = json.loads(result.out)
    assert summary["peft_type"] == "IA3" and summary["modules"] == 10
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert len(config["feedforward_modules"]) == 2  # the FFN output projections
    base_dir = tiny_classifier_dir("bert")
    loaded = peft.PeftModel.from_pretrained(seeded_classifier(base_dir), out).eval()
    factorized = mposurgeon.load_model(trained)
    torch.testing.assert_close(
        sample_logits(loaded, base_dir), sample_logits(factorized, base_dir), rtol=0, atol=1e-5
    )
