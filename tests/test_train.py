"""`train` on tiny models: every architecture, what each mode trains, determinism, resume,
over-parameterized selection (static and dynamic), merge of the trained artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import UsageError
from mposurgeon.stages.train import TrainingInterrupted
from mposurgeon.training import dynamic as dynamic_module
from mposurgeon.training.data import read_dataset
from mposurgeon.training.tasks import get_task, model_inputs
from tests.cli_runner import stop_at_step
from tests.conftest import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
LAYERS = ["FFN_1", "FFN_2", "attention"]
DECODERS = {"gpt2", "bloom", "llama", "llama-tied"}


@pytest.fixture(scope="module")
def decomposed(
    tiny_classifier_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Factory: the tiny model `arch` (with tokenizer) with FFN_1, FFN_2, attention as MPO."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"dec-{arch}") / "dec"
            mposurgeon.decompose(tiny_classifier_dir(arch), output=out, layers=LAYERS)
            cache[arch] = out
        return cache[arch]

    return get


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    return load_file(artifact / "model.safetensors")


def _eval_logits(model: torch.nn.Module, directory: Path) -> torch.Tensor:
    """The model's logits on the shipped eval data, tokenized by `directory`'s tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = get_task("classification").encode(read_dataset(EVAL), tokenizer, 64)
    batch = DataCollatorWithPadding(tokenizer)(rows)
    with torch.no_grad():
        return model.eval()(**model_inputs(model, dict(batch))).logits


# -- every architecture ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_overparam_trains_and_merges_to_the_original_classifier(
    arch: str, tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """FFN, attention and word embeddings as MPO (tied ones stay tied; a classifier has no LM
    head to tie to) trained, merged, and compared with the factorized model."""
    source = tmp_path / "dec"
    mposurgeon.decompose(tiny_classifier_dir(arch), output=source, layers=[*LAYERS, "embeddings"])
    out = tmp_path / "trained"
    result = mposurgeon.train(
        source,
        output=out,
        data=TRAIN,
        eval_data=EVAL,
        mode="overparam",
        max_steps=6,
        lr=1e-2,
        batch_size=32,
    )
    metrics = result.metrics
    assert result.output == out and metrics["steps"] == 6
    assert metrics["trainable_fraction"] == 1.0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval"][-1]["step"] == 6

    manifest = read_manifest(out)
    assert manifest.stage == "train" and manifest.metrics == metrics
    tensors = _tensors(out)
    for name, rec in manifest.modules.items():
        assert rec.weight_key == f"{name}.weight" and f"{name}.mpo.core.0" in tensors
        assert rec.trainable == list(range(len(rec.out_modes))) and rec.rel_error is None
        for key in rec.tied_keys:  # encoder/decoder embeddings share the cores, stored once
            assert key.endswith("embed_tokens.weight") and not any(
                k.startswith(key.removesuffix("weight")) for k in tensors
            )
    if arch in ("bart", "t5"):
        assert sum(len(r.tied_keys) for r in manifest.modules.values()) == 2

    config = AutoConfig.from_pretrained(out)
    assert config.architectures[0].endswith("ForSequenceClassification")
    assert config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == config.pad_token_id
    if arch in DECODERS:  # no pad token of their own: EOS pads, recorded in config
        assert tokenizer.pad_token == tokenizer.eos_token

    merge = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merge.comparison is not None and merge.comparison.ok
    merged = merge.output
    dense = AutoModelForSequenceClassification.from_pretrained(merged)
    factorized = mposurgeon.load_model(out)
    expected = _eval_logits(factorized, out)
    got = _eval_logits(dense, merged)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    # exactly the original architecture and parameter count
    base = tiny_classifier_dir(arch)
    original = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    assert type(dense) is type(original)
    assert sum(p.numel() for p in dense.parameters()) == sum(
        p.numel() for p in original.parameters()
    )
    shapes = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in original.state_dict().items()}


# -- what each mode trains -------------------------------------------------------------------


def test_lightweight_trains_auxiliary_cores_biases_norms_and_head_only(
    decomposed: Callable[[str], Path], tmp_path: Path
) -> None:
    source = decomposed("bert")
    out = tmp_path / "light"
    result = mposurgeon.train(
        source, output=out, data=TRAIN, mode="lightweight", max_steps=4, lr=1e-2, batch_size=32
    )
    before = {f"bert.{k}": v for k, v in _tensors(source).items()}
    after = _tensors(out)
    records = read_manifest(out).modules
    central = {f"{name}.mpo.core.{rec.central_index}" for name, rec in records.items()}

    def trains(key: str) -> bool:
        if ".mpo.core." in key:
            return key not in central
        return key.startswith("classifier.") or key.endswith(".bias") or "LayerNorm" in key

    frozen = [k for k in after if not trains(k)]
    assert any(".mpo.core.2" in k for k in frozen) and "bert.pooler.dense.weight" in frozen
    for key in frozen:
        assert torch.equal(after[key], before[key]), f"{key} is frozen but changed"
    for key in after:
        if ".mpo.core." in key and key not in central:
            assert not torch.equal(after[key], before[key]), f"auxiliary core {key} did not train"
    assert not any(k.startswith("classifier.") for k in before)  # a new head, and it trained
    for rec in records.values():
        assert rec.trainable == [0, 1, 3, 4]

    expected = sum(after[k].numel() for k in after if trains(k))
    m = result.metrics
    assert m["trainable_params"] == expected
    assert m["total_params"] == sum(t.numel() for t in after.values())
    assert m["trainable_fraction"] == pytest.approx(expected / m["total_params"])
    assert m["trainable_fraction"] < 0.25


def test_mpo_lr_gives_the_cores_their_own_learning_rate(
    decomposed: Callable[[str], Path], tmp_path: Path
) -> None:
    """With lr 0 and mpo-lr > 0 only cores move: the head and biases keep their values."""
    source = decomposed("bert")
    common: dict[str, Any] = dict(
        data=TRAIN, mode="overparam", max_steps=2, batch_size=32, lr=1e-12, seed=3
    )
    mposurgeon.train(source, output=tmp_path / "a", mpo_lr=1e-2, **common)
    mposurgeon.train(source, output=tmp_path / "b", mpo_lr=1e-12, **common)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    cores = [k for k in a if ".mpo.core." in k]
    assert all(not torch.equal(a[k], b[k]) for k in cores)
    others = [k for k in a if ".mpo.core." not in k]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in others)


# -- determinism and resume ------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(
    decomposed: Callable[[str], Path], tmp_path: Path
) -> None:
    source = decomposed("bert")  # BERT has dropout: the seed decides the masks
    common: dict[str, Any] = dict(data=TRAIN, mode="overparam", max_steps=4, lr=1e-2)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        mposurgeon.train(source, output=tmp_path / name, seed=seed, **common)
    a, b, c = (_tensors(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_interrupted_run_resumes_to_the_same_weights(
    decomposed: Callable[[str], Path], tmp_path: Path
) -> None:
    """14 steps straight vs killed after step 13 (checkpoint at 12, mid-epoch, with gradient
    accumulation) and resumed from the versioned `.partial` directory."""
    source = decomposed("bert")
    common: dict[str, Any] = dict(
        data=TRAIN,
        mode="overparam",
        epochs=2,
        max_steps=14,
        batch_size=16,
        grad_accum=2,  # 20 batches = 10 steps per epoch
        lr=1e-2,
        warmup_ratio=0.2,
        save_every=4,
        seed=1,
    )
    straight = mposurgeon.train(source, output=tmp_path / "straight", **common)

    workdir = tmp_path / "wd"
    with pytest.raises(TrainingInterrupted) as info:
        mposurgeon.train(source, workdir=workdir, progress=stop_at_step(13), **common)
    partial = info.value.partial
    assert (info.value.step, info.value.checkpoint_step) == (13, 12)
    assert partial.name == "v1-train.partial" and (partial / "checkpoint" / "state.json").is_file()
    assert not (partial.parent / "v1-train").exists()  # no partial artifact

    resumed = mposurgeon.train(source, workdir=workdir, resume=True, **common)
    assert resumed.output == partial.parent / "v1-train" and not partial.exists()
    assert resumed.resumed_from_step == 12
    a, b = _tensors(straight.output), _tensors(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics["loss_history"] == straight.metrics["loss_history"]


def test_resume_refuses_other_options_and_missing_checkpoints(
    decomposed: Callable[[str], Path], tmp_path: Path
) -> None:
    source = decomposed("bert")
    common: dict[str, Any] = dict(data=TRAIN, mode="overparam", max_steps=3, save_every=1)
    with pytest.raises(UsageError, match="nothing to resume"):
        mposurgeon.train(source, output=tmp_path / "o", resume=True, **common)
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(source, output=tmp_path / "o", progress=stop_at_step(2), **common)
    with pytest.raises(UsageError, match="options differ.*lr"):
        mposurgeon.train(source, output=tmp_path / "o", resume=True, lr=1e-3, **common)
    with pytest.raises(UsageError, match="interrupted run left"):
        mposurgeon.train(source, output=tmp_path / "o", **common)
    assert not (tmp_path / "o").exists()


# -- over-parameterized selection ------------------------------------------------------------


def test_overparam_on_a_select_artifact_decomposes_the_choice_in_place(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_classifier_dir("bert")
    sel = mposurgeon.select(
        base, output=tmp_path / "sel", top_n=1, weight_types=["FFN_1"], method="magnitude"
    )
    chosen = sel.chosen
    assert len(chosen) == 1 and not read_manifest(tmp_path / "sel").modules
    out = tmp_path / "trained"
    mposurgeon.train(
        tmp_path / "sel", output=out, data=TRAIN, mode="overparam", max_steps=2, lr=1e-2
    )
    manifest = read_manifest(out)
    assert list(manifest.modules) == [f"bert.{chosen[0]}"]
    rec = manifest.modules[f"bert.{chosen[0]}"]
    assert rec.trainable == [0, 1, 2, 3, 4] and rec.rel_error is None
    assert manifest.selection is not None and manifest.selection.chosen == [f"bert.{chosen[0]}"]
    original = load_file(base / "model.safetensors")
    assert rec.params > original[f"{chosen[0]}.weight"].numel()  # over-parameterized


@pytest.fixture(scope="module")
def dynamic_run(
    decomposed: Callable[[str], Path],
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A dynamic run (2 rounds of 1 matrix per pattern, at epochs 0 and 1) with the cores of
    every matrix as they were right after its decomposition."""
    snapshots: dict[str, list[torch.Tensor]] = {}
    original = dynamic_module.decompose_in_place

    def recording(model: torch.nn.Module, names: Any, num_cores: int = 5) -> Any:
        done = original(model, names, num_cores)
        for name in done:
            cores = model.get_submodule(name).mpo.core
            snapshots[name] = [c.detach().clone() for c in cores]
        return done

    dynamic_module.decompose_in_place = recording  # type: ignore[assignment]
    try:
        out = tmp_path_factory.mktemp("dynamic") / "out"
        result = mposurgeon.train(tiny_classifier_dir("bert"), output=out, **DYNAMIC)
    finally:
        dynamic_module.decompose_in_place = original  # type: ignore[assignment]
    return {"result": result, "snapshots": snapshots, "base": tiny_classifier_dir("bert")}


DYNAMIC: dict[str, Any] = dict(
    data=TRAIN,
    mode="overparam",
    dynamic=True,
    split_num=2,
    top_n=2,
    epochs=2,
    batch_size=32,  # 10 steps per epoch
    lr=1e-2,
)


def test_dynamic_selection_trains_every_core_chosen_in_every_round(
    dynamic_run: dict[str, Any],
) -> None:
    out = dynamic_run["result"].output
    selection = read_manifest(out).selection
    assert selection is not None and selection.schedule is not None
    rounds = selection.schedule.rounds
    assert [r.epoch for r in rounds] == [0, 1]
    first, second = (set(r.chosen or []) for r in rounds)
    assert len(first) == len(second) == 6 and not first & second  # FFN_1, FFN_2, q, k, v, o
    modules = read_manifest(out).modules
    assert set(modules) == first | second == set(dynamic_run["snapshots"])
    tensors = _tensors(out)
    for name, cores in dynamic_run["snapshots"].items():
        assert f"{name}.weight" not in tensors
        for k, at_decomposition in enumerate(cores):
            trained = tensors[f"{name}.mpo.core.{k}"]
            assert not torch.equal(trained, at_decomposition), f"{name} core {k} never trained"


def test_dynamic_run_resumes_across_a_selection_round(
    dynamic_run: dict[str, Any], tmp_path: Path
) -> None:
    """Killed in epoch 1 (after round 2 decomposed its matrices), resumed from step 12."""
    base = dynamic_run["base"]
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(base, output=out, save_every=4, progress=stop_at_step(13), **DYNAMIC)
    resumed = mposurgeon.train(base, output=out, save_every=4, resume=True, **DYNAMIC)
    assert resumed.resumed_from_step == 12
    a, b = _tensors(dynamic_run["result"].output), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_manifest(out).selection == read_manifest(dynamic_run["result"].output).selection


# -- evaluation ------------------------------------------------------------------------------


def test_evaluation_rebuilds_each_mpo_weight_once(
    decomposed: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mposurgeon.methods.mpo.state import mpo_cores
    from mposurgeon.models import layers

    model = mposurgeon.load_model(decomposed("bert"), forward_mode="reconstruct")
    held = mpo_cores(model)
    batch = {"input_ids": torch.arange(40).reshape(2, 20) + 5}
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    calls: list[int] = []
    real = layers.to_matrix
    monkeypatch.setattr(layers, "to_matrix", lambda c, s: calls.append(1) or real(c, s))
    with layers.reuse_dense_weights(model):
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(model(**batch).last_hidden_state, reference)
        assert len(calls) == len(held)  # once per matrix, not once per batch
        first = next(iter(held.values()))
        with torch.no_grad():
            first.core[0].mul_(2.0)  # an in-place change (an optimizer step) is noticed
            model(**batch)
        assert len(calls) == len(held) + 1
        model(**batch)  # with gradients: rebuilt every call, never kept
        assert len(calls) == 2 * len(held) + 1
    assert all(c._kept is None and not c.reuse_matrix for c in held.values())


def test_overparam_follows_a_dynamic_select_schedule(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """A `select --split-num 2` artifact: its choice is round 0, train scores round 1."""
    sel = mposurgeon.select(
        tiny_classifier_dir("bert"),
        output=tmp_path / "sel",
        top_n=2,
        split_num=2,
        epochs=2,
        weight_types=["FFN_2"],
        method="magnitude",
    )
    out = tmp_path / "trained"
    mposurgeon.train(
        tmp_path / "sel", output=out, data=TRAIN, mode="overparam", epochs=2, batch_size=64
    )
    selection = read_manifest(out).selection
    assert selection is not None and selection.schedule is not None
    first, second = (r.chosen or [] for r in selection.schedule.rounds)
    assert first == [f"bert.{n}" for n in sel.chosen]
    assert len(second) == 1 and second != first
    assert set(read_manifest(out).modules) == {*first, *second}
