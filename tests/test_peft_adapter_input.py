"""`merge` and `eval` of a PEFT adapter directory (what `PeftModel.save_pretrained` writes):
merge folds LoRA and IA3 into the base's weights with the PeftModel's logits, eval scores the
PeftModel as it scores the merged checkpoint, prompt tuning is evaluated but not merged, and
what cannot be read or found is a one-line error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import (
    ArtifactError,
    DataError,
    ModelNotFoundError,
    OutputExistsError,
    UsageError,
    VerificationError,
)
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import sample_logits, seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "data" / "sentiment-eval.jsonl"


@pytest.fixture(scope="module")
def base(tiny_classifier_dir: Callable[[str], Path]) -> Path:
    """A tiny BERT without a head (BertModel), with its tokenizer."""
    return tiny_classifier_dir("bert")


def save_adapter(base: Path, out: Path, peft_config: Any, num_labels: int = 2) -> torch.Tensor:
    """A PEFT adapter on a `num_labels` classifier of `base`, every trainable tensor moved off
    its initial value (LoRA's B is no longer zero, IA3's vectors no longer one, the head is
    not the one a seeded load gives), saved to `out`; return its logits (`sample_logits`)."""
    import peft

    wrapped = peft.get_peft_model(seeded_classifier(base, num_labels), peft_config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    wrapped.save_pretrained(out)
    return sample_logits(wrapped.eval(), base)


def lora_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"
    )


@pytest.fixture(scope="module")
def lora(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    out = tmp_path_factory.mktemp("peft") / "lora"
    return out, save_adapter(base, out, lora_config())


@pytest.fixture(scope="module")
def lora_merged(lora: tuple[Path, torch.Tensor], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "lora"
    result = mposurgeon.merge(lora[0], output=out, verify=True)
    assert result.comparison is not None and result.comparison.ok
    assert (result.merged_modules, result.peft_type) == (4, "LORA")  # query, value x 2 layers
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _classifier(directory: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory).eval()


def _int_labels(tmp_path: Path) -> Path:
    """The shipped eval data with its labels as the ids train gives them (negative 0,
    positive 1): a merged adapter's config has only transformers' default label names."""
    ids = {"negative": 0, "positive": 1}
    rows = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "eval-ids.jsonl"
    path.write_text(
        "".join(json.dumps({**r, "label": ids[r["label"]]}) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


# -- merge -------------------------------------------------------------------------------------


def test_merge_of_a_lora_adapter_gives_the_peft_models_logits(
    lora: tuple[Path, torch.Tensor], lora_merged: Path, base: Path
) -> None:
    """The merged checkpoint is a plain BertForSequenceClassification with the PeftModel's
    logits; the LoRA update is in the query and value weights, the adapter's head is the
    head; the base's tokenizer files come along; the manifest names base and adapter."""
    path, logits = lora
    merged = _classifier(lora_merged)
    torch.testing.assert_close(sample_logits(merged, base), logits, rtol=0, atol=1e-5)
    assert merged.config.architectures == ["BertForSequenceClassification"]
    assert merged.config.num_labels == 2
    tensors, original = _tensors(lora_merged), load_file(base / "model.safetensors")
    query = "encoder.layer.0.attention.self.query.weight"
    key = "encoder.layer.0.attention.self.key.weight"
    assert (tensors[f"bert.{query}"] - original[query]).abs().max() > 1e-2  # B A folded in
    assert torch.equal(tensors[f"bert.{key}"], original[key])  # not targeted: bit for bit
    saved = load_file(path / "adapter_model.safetensors")
    assert torch.equal(tensors["classifier.weight"], saved["base_model.model.classifier.weight"])
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert (lora_merged / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    manifest = read_manifest(lora_merged)
    assert manifest.stage == "merge" and manifest.modules == {}
    assert manifest.base.path == str(base)
    options = manifest.lineage[-1].options
    assert options["adapter"] == str(path.resolve()) and options["peft_type"] == "LORA"
    assert manifest.metrics is not None and manifest.metrics["verify"]["ok"] is True
    card = (lora_merged / "README.md").read_text(encoding="utf-8")
    assert str(path.resolve()) in card and str(base) in card


def test_merge_of_an_ia3_adapter_gives_the_peft_models_logits(base: Path, tmp_path: Path) -> None:
    import peft

    config = peft.IA3Config(
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
        task_type="SEQ_CLS",
    )
    logits = save_adapter(base, tmp_path / "ia3", config, num_labels=3)
    result = mposurgeon.merge(tmp_path / "ia3", output=tmp_path / "merged", verify=True)
    assert (result.merged_modules, result.peft_type) == (8, "IA3")  # 4 per layer x 2
    assert result.comparison is not None and result.comparison.ok
    merged = _classifier(tmp_path / "merged")
    assert merged.config.num_labels == 3  # the adapter's head's size
    torch.testing.assert_close(sample_logits(merged, base), logits, rtol=0, atol=1e-5)


def test_merge_keeps_the_bases_dtypes_unless_told(base: Path, tmp_path: Path) -> None:
    """A float16 base gives a float16 checkpoint, the adapter's new head included (merged in
    float32, then cast); --dtype float32 writes every weight in float32."""
    from transformers import AutoModel

    half = tmp_path / "half"
    AutoModel.from_pretrained(base).half().save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, half / name)
    save_adapter(half, tmp_path / "lora", lora_config())
    mposurgeon.merge(tmp_path / "lora", output=tmp_path / "auto")
    assert {t.dtype for t in _tensors(tmp_path / "auto").values()} == {torch.float16}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "float16"
    mposurgeon.merge(tmp_path / "lora", output=tmp_path / "f32", dtype="float32")
    assert {t.dtype for t in _tensors(tmp_path / "f32").values()} == {torch.float32}
    import peft

    upcast = seeded_classifier(half).float()  # the adapter on the base in float32
    logits = sample_logits(peft.PeftModel.from_pretrained(upcast, tmp_path / "lora"), half)
    merged = _classifier(tmp_path / "f32")
    torch.testing.assert_close(sample_logits(merged, half), logits, rtol=0, atol=1e-5)


def test_a_failed_verify_writes_nothing(
    lora: tuple[Path, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mposurgeon.stages import merge as merge_stage

    monkeypatch.setitem(merge_stage.TOLERANCES, torch.float32, (-1.0, 0.0))
    with pytest.raises(VerificationError, match="differ from the PeftModel's"):
        mposurgeon.merge(lora[0], output=tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists()


# -- eval --------------------------------------------------------------------------------------


def test_eval_of_the_adapter_scores_as_its_merged_checkpoint(
    lora: tuple[Path, torch.Tensor], lora_merged: Path, tmp_path: Path
) -> None:
    """The PeftModel, unmerged, scores as the merged checkpoint: the same accuracy and MCC,
    the loss to float rounding; string labels are numbered as train numbers them (sorted),
    so the adapter scores the same on them as on their ids."""
    ids = _int_labels(tmp_path)
    adapter = mposurgeon.evaluate(lora[0], data=ids)
    merged = mposurgeon.evaluate(lora_merged, data=ids)
    named = mposurgeon.evaluate(lora[0], data=EVAL)
    assert adapter.kind == "peft" and adapter.task == "classification"
    assert adapter.labels == ["0", "1"] and named.labels == ["negative", "positive"]
    assert adapter.metrics["rows"] == merged.metrics["rows"] == 112
    for key in ("accuracy", "macro_f1", "mcc"):
        assert adapter.metrics[key] == merged.metrics[key] == named.metrics[key]
    assert adapter.metrics["loss"] == pytest.approx(merged.metrics["loss"], abs=1e-5)
    assert named.metrics["loss"] == adapter.metrics["loss"]


def test_prompt_tuning_is_evaluated_but_not_merged(base: Path, tmp_path: Path) -> None:
    """Virtual tokens have no dense form: merge refuses in one line naming what to use; eval
    runs the PeftModel, and its accuracy and loss are those of the model PEFT loads."""
    import peft
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    save_adapter(base, tmp_path / "prompt", config)
    with pytest.raises(UsageError, match="PROMPT_TUNING adapter") as err:
        mposurgeon.merge(tmp_path / "prompt", output=tmp_path / "out")
    assert "peft.PeftModel.from_pretrained" in (err.value.hint or "")
    assert not (tmp_path / "out").exists()

    result = mposurgeon.evaluate(tmp_path / "prompt", data=EVAL)
    loaded = peft.PeftModel.from_pretrained(seeded_classifier(base), tmp_path / "prompt").eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    labels = torch.tensor([int(r["label"] == "positive") for r in rows])
    with torch.no_grad():
        logits = torch.cat(
            [loaded(**tokenizer(r["text"], return_tensors="pt")).logits for r in rows]
        )
    accuracy = (logits.argmax(-1) == labels).double().mean().item()
    assert result.metrics["rows"] == 112
    assert result.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result.metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)


def test_a_base_classifiers_label_names_are_kept(
    lora: tuple[Path, torch.Tensor], base: Path, tmp_path: Path
) -> None:
    """Over a base that is a classifier of the head's size with label names of its own (here
    in the reverse of the sorted order), eval numbers the labels by the base's label2id: every
    binary prediction flips meaning."""
    reverse = tmp_path / "reverse"
    shutil.copytree(base, reverse)
    config = json.loads((reverse / "config.json").read_text(encoding="utf-8"))
    config |= {
        "architectures": ["BertForSequenceClassification"],
        "id2label": {"0": "positive", "1": "negative"},
        "label2id": {"positive": 0, "negative": 1},
    }
    (reverse / "config.json").write_text(json.dumps(config), encoding="utf-8")
    sorted_ = mposurgeon.evaluate(lora[0], data=EVAL)
    flipped = mposurgeon.evaluate(lora[0], data=EVAL, base=str(reverse))
    assert flipped.labels == ["positive", "negative"]
    assert flipped.metrics["accuracy"] == pytest.approx(1 - sorted_.metrics["accuracy"])
    assert flipped.metrics["mcc"] == pytest.approx(-sorted_.metrics["mcc"])


def test_eval_data_with_labels_the_head_cannot_number_is_refused(
    lora: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    data = tmp_path / "three.jsonl"
    rows = [{"text": "a fine film", "label": name} for name in ("bad", "good", "meh")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match="holds 3 labels .* has 2 outputs"):
        mposurgeon.evaluate(lora[0], data=data)


# -- errors ------------------------------------------------------------------------------------


def _copy(adapter: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(adapter, out)
    return out


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, **changes}), encoding="utf-8")


def test_a_base_is_needed_and_must_exist(
    lora: tuple[Path, torch.Tensor], base: Path, tmp_path: Path
) -> None:
    """No base recorded and no --base; a recorded base that is gone; a --base that does not
    exist: one-line errors (the missing ones exit 4); --base finds the base again."""
    adapter = _copy(lora[0], tmp_path)
    _edit_config(adapter, base_model_name_or_path=None)
    with pytest.raises(UsageError, match="records no base model") as err:
        mposurgeon.merge(adapter, output=tmp_path / "out")
    assert "--base" in (err.value.hint or "")
    with pytest.raises(UsageError, match="records no base model"):
        mposurgeon.evaluate(adapter, data=EVAL)
    _edit_config(adapter, base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(ModelNotFoundError, match=r"base model .*gone \(recorded in adapter_co"):
        mposurgeon.merge(adapter, output=tmp_path / "out")
    with pytest.raises(ModelNotFoundError, match=r"no such file or directory: .*nowhere"):
        mposurgeon.merge(adapter, output=tmp_path / "out", base=str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()
    result = mposurgeon.evaluate(adapter, data=EVAL, base=str(base))
    assert result.metrics["rows"] == 112
    with pytest.raises(UsageError, match="--base applies to a PEFT adapter directory"):
        mposurgeon.merge(base, output=tmp_path / "out", base=str(base))


def test_a_damaged_adapter_directory_is_refused(
    lora: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    adapter = _copy(lora[0], tmp_path)
    config = adapter / "adapter_config.json"
    text = config.read_text(encoding="utf-8")
    config.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ArtifactError, match="adapter_config.json cannot be read as JSON"):
        mposurgeon.merge(adapter, output=tmp_path / "out")
    with pytest.raises(ArtifactError, match="adapter_config.json cannot be read as JSON"):
        mposurgeon.evaluate(adapter, data=EVAL)
    config.write_text(text, encoding="utf-8")
    _edit_config(adapter, peft_type="LOHA")
    with pytest.raises(UsageError, match="is a LOHA PEFT adapter: merge and eval read LORA"):
        mposurgeon.merge(adapter, output=tmp_path / "out")
    config.write_text(text, encoding="utf-8")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="has no adapter_model.safetensors"):
        mposurgeon.evaluate(adapter, data=EVAL)
    assert not (tmp_path / "out").exists()


def test_a_classifier_head_neither_holds_is_refused(
    lora: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    """A SEQ_CLS adapter without its head over a base without one: the head would be
    random."""
    adapter = _copy(lora[0], tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "classifier" not in k}
    save_file(tensors, weights)
    with pytest.raises(UsageError, match="saves no classification head .* would be random"):
        mposurgeon.merge(adapter, output=tmp_path / "out")


def test_an_existing_output_needs_overwrite(
    lora: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        mposurgeon.merge(lora[0], output=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    mposurgeon.merge(lora[0], output=out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_merge_of_an_adapter_with_base(
    lora: tuple[Path, torch.Tensor], base: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "merged"
    result = run_cli(capsys, "merge", lora[0], "--base", base, "-o", out, "--verify", "--json")
    assert result.code == 0, result
    summary = json.loads(result.out)
    assert summary["merged_modules"] == 4 and summary["peft_type"] == "LORA"
    assert summary["base"] == str(base) and summary["output"] == str(out)
    assert summary["verify"]["ok"] is True
    assert result.err == ""
    torch.testing.assert_close(sample_logits(_classifier(out), base), lora[1], rtol=0, atol=1e-5)
    again = run_cli(capsys, "merge", lora[0], "-o", out)
    assert_one_line_error(again, 1, "exists and is not empty")
    missing = run_cli(capsys, "merge", lora[0], "--base", tmp_path / "nowhere", "-o", out)
    assert_one_line_error(missing, 4, "no such file or directory")


def test_cli_eval_of_an_adapter(lora: tuple[Path, torch.Tensor], base: Path, capsys) -> None:
    result = run_cli(capsys, "eval", lora[0], "--base", base, "--data", EVAL, "--json")
    assert result.code == 0, result
    report = json.loads(result.out)
    assert report["task"] == "classification"
    assert report["labels"] == ["negative", "positive"] and report["metrics"]["rows"] == 112
    assert result.err == ""
    expected = mposurgeon.evaluate(lora[0], data=EVAL).metrics
    assert report["metrics"]["accuracy"] == expected["accuracy"]
    text = run_cli(capsys, "eval", lora[0], "--data", EVAL, "-q")
    assert text.code == 0 and "(peft) on sentiment-eval.jsonl: classification" in text.out


def test_causal_lm_adapters_on_gpt2(tiny_classifier_dir: Callable[[str], Path], tmp_path) -> None:
    """GPT-2's Conv1D layers (fan_in_fan_out): a LoRA adapter merges to the PeftModel's
    logits. Prompt tuning gives logits for its virtual tokens too: eval drops them, so its loss
    is that of each token given the ones before it (and the prompt), as for any causal LM."""
    import peft
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpt2 = tiny_classifier_dir("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    texts = [json.loads(line)["text"] for line in EVAL.read_text(encoding="utf-8").splitlines()]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:24]), encoding="utf-8")
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts[:24]]

    def adapter(name: str, config: Any) -> Any:
        wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2), config)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in wrapped.parameters():
                if param.requires_grad:
                    param.add_(0.5 * torch.randn(param.shape, generator=generator))
        wrapped.save_pretrained(tmp_path / name)
        return wrapped.eval()

    lora = adapter(
        "lora",
        peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    result = mposurgeon.merge(tmp_path / "lora", output=tmp_path / "merged", verify=True)
    assert result.merged_modules == 2 and result.comparison is not None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = torch.tensor([ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=batch).logits, lora(input_ids=batch).logits, rtol=0, atol=1e-5
        )

    prompt = adapter("prompt", peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    scores = mposurgeon.evaluate(tmp_path / "prompt", data=data).metrics
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = prompt(input_ids=torch.tensor([row])).logits[0, 3:]
            total += F.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum").item()
            tokens += len(row) - 1
    assert scores["tokens"] == tokens
    assert scores["loss"] == pytest.approx(total / tokens, abs=1e-5)


def test_what_export_peft_writes_merges_and_scores_as_its_artifact(
    base: Path, tmp_path: Path
) -> None:
    """train --method lora, export-peft, then merge and eval of the adapter directory: the
    logits of merging the artifact itself, and the scores of the artifact (an adapter records
    no label names; the data's, numbered as train numbers them, are the artifact's)."""
    train = REPO / "data" / "sentiment-train.jsonl"
    artifact = tmp_path / "lora"
    mposurgeon.train(
        base, output=artifact, method="lora", lora_r=4, layers="attention", data=train,
        max_steps=6, batch_size=16, lr=1e-2,
    )  # fmt: skip
    mposurgeon.export_peft(artifact, output=tmp_path / "adapter")
    mposurgeon.merge(tmp_path / "adapter", output=tmp_path / "from-adapter", verify=True)
    mposurgeon.merge(artifact, output=tmp_path / "from-artifact")
    torch.testing.assert_close(
        sample_logits(_classifier(tmp_path / "from-adapter"), base),
        sample_logits(_classifier(tmp_path / "from-artifact"), base),
        rtol=0,
        atol=1e-5,
    )
    scores = mposurgeon.evaluate(tmp_path / "adapter", data=EVAL)
    expected = mposurgeon.evaluate(artifact, data=EVAL)
    assert scores.labels == expected.labels == ["negative", "positive"]
    for key in ("accuracy", "macro_f1", "mcc"):
        assert scores.metrics[key] == expected.metrics[key]
    assert scores.metrics["loss"] == pytest.approx(expected.metrics["loss"], abs=1e-5)
