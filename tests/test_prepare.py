"""The PEFT-shaped Python API: prepare a live model, train it with `transformers.Trainer` or an
own loop, save it as an artifact, load it back, merge and unload it (issue 16, item 2)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import UsageError
from mposurgeon.models.layers import MPOLinear

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a fine and moving film", "dull, long and empty", "great fun", "a waste of time"] * 4


def _rows(tokenizer) -> list[dict[str, object]]:
    return [
        {**tokenizer(text, truncation=True, max_length=16), "labels": i % 2}
        for i, text in enumerate(TEXTS)
    ]


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(TEXTS[:4], padding=True, return_tensors="pt")


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _classifier(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _train_with_trainer(model, tokenizer, tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_rows(tokenizer),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()


def test_trainer_trains_a_prepared_model_that_saves_loads_and_merges(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = tiny_classifier_dir("bert")
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = _batch(tokenizer)
    model = _classifier(source)
    before = _logits(model, batch)
    model = mposurgeon.prepare(model, method="lightweight", layers=["FFN_1", "attention"])

    state = model.mposurgeon
    assert len(state.decomposed) == 2 * 5  # 2 blocks: intermediate + q, k, v, output
    assert all(isinstance(model.get_submodule(n), MPOLinear) for n in state.decomposed)
    torch.testing.assert_close(_logits(model, batch), before, atol=1e-5, rtol=0)  # lossless
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    central = {n for n in trainable if ".mpo.core.2" in n}
    assert trainable and not central  # lightweight: the central cores stay frozen
    assert all(".mpo.core." in n or "classifier" in n or n.endswith((".bias", "LayerNorm.weight"))
               for n in trainable)  # fmt: skip
    assert state.summary().startswith("trainable params: ")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    _train_with_trainer(model, tokenizer, tmp_path)
    trained = _logits(model, batch)
    assert not torch.allclose(trained, before, atol=1e-3)  # the steps moved the model
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name

    out = mposurgeon.save_artifact(model, tmp_path / "tuned", tokenizer=tokenizer)
    manifest = read_manifest(out)
    assert manifest.stage == "prepare" and manifest.base.path == str(source)
    assert manifest.lineage[-1].options["method"] == "lightweight"
    assert len(manifest.modules) == 10
    loaded = mposurgeon.load_model(out)
    torch.testing.assert_close(_logits(loaded, batch), trained, atol=1e-5, rtol=0)

    dense = mposurgeon.merge_and_unload(model)
    assert type(dense) is type(model)
    assert not any(isinstance(m, MPOLinear) for m in dense.modules())
    torch.testing.assert_close(_logits(dense, batch), trained, atol=1e-5, rtol=0)
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    assert isinstance(model.get_submodule(state.decomposed[0]), MPOLinear)  # left as it was


def test_lora_in_an_own_loop(tiny_classifier_dir: Callable[[str], Path], tmp_path: Path) -> None:
    source = tiny_classifier_dir("bert")
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = _batch(tokenizer)
    model = mposurgeon.prepare(
        _classifier(source), "lora", target_modules=["query", "value"], lora_r=4
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-2] for n in trainable if "lora_" in n} == {"default"}
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert len(model.mposurgeon.records) == 4  # query and value of 2 blocks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = _logits(model, batch)

    out = mposurgeon.save_artifact(model, tmp_path / "lora")
    assert (out / "tokenizer_config.json").is_file()  # copied from the source
    torch.testing.assert_close(
        _logits(mposurgeon.load_model(out), batch), trained, atol=1e-5, rtol=0
    )
    dense = mposurgeon.merge_and_unload(model)
    torch.testing.assert_close(_logits(dense, batch), trained, atol=1e-5, rtol=0)


def test_an_artifact_loaded_with_load_model_keeps_its_cores_and_lineage(
    tiny_mpo: Path, tmp_path: Path
) -> None:
    """A decompose artifact through `load_model`: lightweight trains its MPO modules as they
    are (nothing decomposed again), and the saved artifact continues the lineage."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_mpo)
    batch = _batch(tokenizer)
    model = mposurgeon.load_model(tiny_mpo, task="sequence-classification")
    model = mposurgeon.prepare(model, "lightweight")
    assert model.mposurgeon.decomposed == []
    assert len(model.mposurgeon.records) == len(read_manifest(tiny_mpo).modules)
    expected = _logits(model, batch)
    out = mposurgeon.save_artifact(model, tmp_path / "again")
    manifest = read_manifest(out)
    assert [e.stage for e in manifest.lineage] == ["decompose", "prepare"]
    assert manifest.parent is not None and manifest.parent.path == str(tiny_mpo)
    torch.testing.assert_close(_logits(mposurgeon.load_model(out), batch), expected)


def test_bad_uses_are_one_line_errors_and_lose_nothing(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = tiny_classifier_dir("bert")
    plain = _classifier(source)
    with pytest.raises(UsageError, match="was not prepared by mposurgeon"):
        mposurgeon.save_artifact(plain, tmp_path / "x")
    with pytest.raises(UsageError, match="decomposes nothing and has no layers option"):
        mposurgeon.prepare(plain, "bitfit", layers=["FFN_1"])
    with pytest.raises(UsageError, match="lora option r: Extra inputs are not permitted"):
        mposurgeon.prepare(plain, "lora", r=4)
    with pytest.raises(UsageError, match="only `mposurgeon train` applies"):
        mposurgeon.prepare(plain, "mpoe")
    with pytest.raises(UsageError, match="'lorra' is not a known method"):
        mposurgeon.prepare(plain, "lorra")
    built = AutoModelForSequenceClassification.from_config(plain.config)
    built.name_or_path = ""
    with pytest.raises(UsageError, match="was not loaded from a checkpoint"):
        mposurgeon.prepare(built, "lora")
    assert not hasattr(plain, "mposurgeon") and not hasattr(built, "mposurgeon")

    model = mposurgeon.prepare(plain, "bitfit")
    with pytest.raises(UsageError, match="already prepared for bitfit"):
        mposurgeon.prepare(model, "lora")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="exists"):
        mposurgeon.save_artifact(model, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert json.loads((mposurgeon.save_artifact(model, taken, overwrite=True) / "mposurgeon.json")
                      .read_text())["stage"] == "prepare"  # fmt: skip
