"""`train --method prompt-tuning`: PEFT's prompt tuning in place: exact counts, budgets, the
forward equals PEFT's, merge refuses in one line, export-peft round trips, causal LMs train
with logits aligned to their input, generation is refused before any work."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods.prompt_tuning.config import PromptTuningConfig
from mposurgeon.methods.registry import get_method
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import sample_logits, seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


def test_budget_picks_the_longest_prompt_that_fits(minilm_dir: Path) -> None:
    for config, tokens in [
        (PromptTuningConfig(), 20),
        (PromptTuningConfig(num_virtual_tokens=7), 7),
        (PromptTuningConfig(budget=10 * 384 + 383), 10),
    ]:
        model = seeded_classifier(minilm_dir)
        method = get_method(config)
        (record,) = method.prepare(model, {}, []).values()
        method.set_trainable(model)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        prompt = "bert.embeddings.word_embeddings.prompt"
        assert sorted(trained) == [prompt, "classifier.bias", "classifier.weight"]
        assert record.params == tokens * 384 == model.get_input_embeddings().prompt.numel()


def test_the_forward_is_peft_prompt_tuning(minilm_dir: Path) -> None:
    """The same prompt in PEFT's PeftModelForSequenceClassification gives the same logits
    (token types and attention mask grown by the prompt)."""
    import peft

    model = seeded_classifier(minilm_dir)
    method = get_method(PromptTuningConfig(num_virtual_tokens=5))
    torch.manual_seed(0)
    method.prepare(model, {}, [])
    prompt = model.get_input_embeddings().prompt.detach().clone()
    reference = peft.get_peft_model(
        seeded_classifier(minilm_dir),
        peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=384),
    )
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(prompt)
    ours, theirs = (
        sample_logits(model.eval(), minilm_dir),
        sample_logits(reference.eval(), minilm_dir),
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert float((ours - sample_logits(seeded_classifier(minilm_dir), minilm_dir)).abs().max()) > 0


@pytest.fixture(scope="module")
def trained(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prompt") / "bert"
    mposurgeon.train(
        tiny_classifier_dir("bert"), output=out, method="prompt-tuning", num_virtual_tokens=4,
        data=TRAIN, eval_data=EVAL, max_steps=4, batch_size=16,
    )  # fmt: skip
    return out


def test_merge_refuses_and_load_model_and_export_peft_run_it(
    trained: Path, tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    import peft

    (record,) = read_manifest(trained).modules.values()
    assert record.method == "prompt-tuning" and record.num_virtual_tokens == 4  # type: ignore[attr-defined]
    result = run_cli(capsys, "merge", trained, "-o", tmp_path / "m")
    assert_one_line_error(result, 2, "adds computation that no dense weight can hold")
    assert "export-peft" in result.err and not (tmp_path / "m").exists()

    out = tmp_path / "adapter"
    result = run_cli(capsys, "export-peft", trained, "-o", out, "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["peft_type"] == "PROMPT_TUNING"
    base_dir = tiny_classifier_dir("bert")
    loaded = peft.PeftModel.from_pretrained(seeded_classifier(base_dir), out).eval()
    ours = sample_logits(mposurgeon.load_model(trained), base_dir)
    torch.testing.assert_close(sample_logits(loaded, base_dir), ours, rtol=0, atol=1e-5)
    # eval of the artifact scores what train's last evaluation scored
    metrics = read_manifest(trained).metrics or {}
    scores = mposurgeon.evaluate(trained, data=EVAL).metrics
    assert scores["accuracy"] == metrics["eval_accuracy"]


def test_a_causal_lm_runs_with_logits_aligned_to_its_input_and_never_generates(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    base = tiny_classifier_dir("gpt2")
    lines = TRAIN.read_text(encoding="utf-8").splitlines()[:8]
    rows = tmp_path / "lm.jsonl"
    rows.write_text("".join(json.dumps({"text": json.loads(x)["text"]}) + "\n" for x in lines))
    out = tmp_path / "lm"
    result = mposurgeon.train(
        base, output=out, method="prompt-tuning", num_virtual_tokens=3, data=rows,
        eval_data=rows, max_steps=2, batch_size=4, task="causal-lm",
    )  # fmt: skip
    assert result.metrics["trainable_params"] == 3 * 32
    model = mposurgeon.load_model(out)
    assert model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.shape[1] == 4
    refused = run_cli(
        capsys, "train", base, "--method", "prompt-tuning", "--data", rows, "--task",
        "causal-lm", "--generate", "-o", tmp_path / "g",
    )  # fmt: skip
    assert_one_line_error(refused, 2, "prompt-tuning models cannot generate")
    assert not (tmp_path / "g").exists()
