"""`train --method lora` (through peft): exact parameter counts, the model at initialization
is the base model, merge folds W + (alpha / r) B A, load_model runs the artifact, and the
artifact stores PEFT's factors under the module's own names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import UsageError
from mposurgeon.methods.base import head_parameter_names
from mposurgeon.methods.lora.config import LoraConfig
from mposurgeon.methods.registry import get_method
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import sample_logits, seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


def test_minilm_lora_r8_on_query_and_value_trains_exactly_73728_parameters(
    minilm_dir: Path,
) -> None:
    """6 layers x 2 matrices x r 8 x (384 in + 384 out); at initialization (B = 0) the logits
    are the base model's, bit for bit."""
    model = seeded_classifier(minilm_dir)
    base = sample_logits(model, minilm_dir)
    method = get_method(LoraConfig(lora_r=8))
    records = method.prepare(model, {}, [])
    method.set_trainable(model)
    head = head_parameter_names(model)
    trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    in_head = sum(p.numel() for n, p in model.named_parameters() if n in head)
    assert trained - in_head == 6 * 2 * 8 * (384 + 384) == 73_728
    assert sum(r.params for r in records.values()) == 73_728
    assert sorted({n.rsplit(".", 1)[-1] for n in records}) == ["query", "value"]
    assert torch.equal(sample_logits(model.eval(), minilm_dir), base)


@pytest.fixture(scope="module")
def trained(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "bert"
    mposurgeon.train(
        tiny_classifier_dir("bert"), output=out, method="lora", lora_r=4, lora_alpha=8,
        layers="attention", data=TRAIN, eval_data=EVAL, max_steps=6, batch_size=16, lr=1e-2,
    )  # fmt: skip
    return out


def test_the_artifact_holds_the_base_weights_and_the_factors(trained: Path) -> None:
    manifest = read_manifest(trained)
    tensors = load_file(trained / "model.safetensors")
    assert manifest.metrics is not None and manifest.metrics["method"] == "lora"
    assert len(manifest.modules) == 8  # 2 layers x query, key, value, attention output
    for name, rec in manifest.modules.items():
        assert rec.method == "lora" and rec.r == 4 and rec.alpha == 8  # type: ignore[attr-defined]
        for key, shape in rec.tensor_shapes().items():
            assert tuple(tensors[key].shape) == shape
        assert float(tensors[f"{name}.lora_B.weight"].abs().max()) > 0  # B trained off zero
    assert not any(".base_layer." in k or ".default." in k for k in tensors)


def test_merge_folds_the_update_and_load_model_runs_the_artifact(
    trained: Path, tmp_path: Path
) -> None:
    merged = mposurgeon.merge(trained, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    assert merged.merged_modules == 8
    tensors = load_file(trained / "model.safetensors")
    dense = load_file(tmp_path / "merged" / "model.safetensors")
    name = next(iter(read_manifest(trained).modules))
    a, b = tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()
    expected = tensors[f"{name}.weight"].double() + (8 / 4) * b @ a
    torch.testing.assert_close(dense[f"{name}.weight"].double(), expected, rtol=0, atol=1e-6)
    assert not any("lora" in k for k in dense)
    # the merged checkpoint and the factorized artifact score the same
    a_scores = mposurgeon.evaluate(trained, data=EVAL).metrics
    m_scores = mposurgeon.evaluate(tmp_path / "merged", data=EVAL).metrics
    assert a_scores["accuracy"] == m_scores["accuracy"]
    assert a_scores["loss"] == pytest.approx(m_scores["loss"], abs=1e-5)


def test_gpt2_conv1d_layers_merge_transposed(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """GPT-2 stores Conv1D weights as (in, out): PEFT's fan_in_fan_out path."""
    out = tmp_path / "gpt2"
    mposurgeon.train(
        tiny_classifier_dir("gpt2"), output=out, method="lora", data=TRAIN, max_steps=3,
        batch_size=16, lr=1e-2,
    )  # fmt: skip
    records = read_manifest(out).modules
    assert records and all(r.kind == "conv1d" for r in records.values())
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok


def test_bad_lora_options_are_refused_before_any_work(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    base = tiny_classifier_dir("bert")
    out = tmp_path / "o"
    cases = [
        (("--lora-r", "0"), "invalid option --lora-r"),
        (("--layers", "embeddings"), "the targets include an embedding"),
        (("--target-modules", "nothing.*"), "select no module"),
        (("--method", "full", "--lora-r", "4"), "--lora-r is not an option of method full"),
    ]
    for extra, needle in cases:
        args = ("train", base, "--data", TRAIN, "--max-steps", "1", "-o", out)
        method = () if "--method" in extra else ("--method", "lora")
        assert_one_line_error(run_cli(capsys, *args, *method, *extra), 2, needle)
        assert not out.exists()
    with pytest.raises(UsageError, match="no default targets"):
        get_method("lora").prepare(seeded_classifier(tiny_classifier_dir("albert")), {}, [])


def test_a_budget_picks_the_largest_rank_that_fits(minilm_dir: Path) -> None:
    """Rank 1 of query and value in 6 layers trains 12 x 768 = 9,216 parameters."""
    for budget, rank in [(73_728, 8), (73_727, 7), (9_216, 1)]:
        model = seeded_classifier(minilm_dir)
        records = get_method(LoraConfig(budget=budget)).prepare(model, {}, [])
        assert {r.r for r in records.values()} == {rank}  # type: ignore[attr-defined]
        assert sum(r.params for r in records.values()) == 9_216 * rank <= budget
    with pytest.raises(UsageError, match="below one rank"):
        get_method(LoraConfig(budget=9_215)).prepare(seeded_classifier(minilm_dir), {}, [])


def test_export_peft_round_trip_gives_the_artifacts_logits(
    trained: Path, tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    """export-peft writes an adapter that peft loads onto the base checkpoint (a classifier
    with the same labels) with the artifact's outputs; the head travels as modules_to_save."""
    import json

    import peft

    out = tmp_path / "adapter"
    result = run_cli(capsys, "export-peft", trained, "-o", out, "--json")
    assert result.code == 0, result
    summary = json.loads(result.out)
    assert summary["modules"] == 8 and summary["peft_type"] == "LORA"
    assert summary["method"] == "lora" and summary["task_type"] == "SEQ_CLS"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    base_dir = tiny_classifier_dir("bert")
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base_dir)
    assert result.err == ""  # no warnings from peft or transformers
    base = seeded_classifier(base_dir)  # a fresh random head: the adapter brings the trained one
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    factorized = mposurgeon.load_model(trained)
    torch.testing.assert_close(
        sample_logits(loaded, base_dir), sample_logits(factorized, base_dir), rtol=0, atol=1e-5
    )


def test_export_peft_refuses_what_peft_cannot_hold(tiny_mpo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    result = run_cli(capsys, "export-peft", tiny_mpo, "-o", out)
    assert_one_line_error(result, 2, "has modules of mpo: a PEFT adapter holds one method PEFT")
    assert not out.exists()
