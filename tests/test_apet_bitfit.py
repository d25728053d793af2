"""`train --method apet` (exactly --budget elements train, the rest stays bitwise) and
`--method bitfit` (only biases train)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.errors import UsageError
from mposurgeon.methods.apet.config import ApetConfig
from mposurgeon.methods.apet.method import choose_elements
from mposurgeon.methods.base import head_parameter_names
from mposurgeon.methods.registry import get_method
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import sample_logits, seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"


def _method_params(model: torch.nn.Module) -> int:
    head = head_parameter_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 5000), st.data())
def test_choose_elements_draws_exactly_budget_distinct_positions(total: int, data) -> None:
    budget = data.draw(st.integers(1, total))
    seed = data.draw(st.integers(0, 2**31))
    picked = choose_elements(total, budget, seed)
    assert picked.numel() == budget and picked.unique().numel() == budget
    assert torch.equal(picked, picked.sort().values)
    assert int(picked.min()) >= 0 and int(picked.max()) < total
    assert torch.equal(picked, choose_elements(total, budget, seed))  # the seed decides


def test_minilm_apet_4096_trains_exactly_4096_elements_and_starts_as_the_base(
    minilm_dir: Path,
) -> None:
    model = seeded_classifier(minilm_dir)
    base = sample_logits(model, minilm_dir)
    method = get_method(ApetConfig(budget=4096, budget_seed=7))
    records = method.prepare(model, {}, [])
    method.set_trainable(model)
    assert _method_params(model) == 4096 == sum(r.params for r in records.values())
    assert len(records) == 36  # spread over every block matrix of the 6 layers
    assert torch.equal(sample_logits(model.eval(), minilm_dir), base)
    with pytest.raises(UsageError, match="more than the"):
        get_method(ApetConfig(budget=10**9)).prepare(seeded_classifier(minilm_dir), {}, [])


@pytest.fixture(scope="module")
def apet_runs(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("apet")
    base = tiny_classifier_dir("bert")
    common = dict(method="apet", data=TRAIN, max_steps=4, batch_size=16, lr=1e-2, budget=300)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        mposurgeon.train(base, output=root / name, budget_seed=seed, **common)
    mposurgeon.merge(root / "a", output=root / "merged", verify=True)
    return {"root": root, "base": base}


def _masks(artifact: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(artifact / "model.safetensors")
    return {k: v for k, v in tensors.items() if k.endswith(".apet.index")}


def test_the_same_seed_chooses_the_same_elements(apet_runs: dict[str, Path]) -> None:
    root = apet_runs["root"]
    a, b, c = _masks(root / "a"), _masks(root / "b"), _masks(root / "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(v.numel() for v in a.values()) == sum(v.numel() for v in c.values()) == 300
    assert a.keys() != c.keys() or any(not torch.equal(a[k], c[k]) for k in a)
    metrics = read_manifest(root / "a").metrics
    assert metrics is not None and metrics["method_options"]["budget"] == 300


def test_after_merge_only_the_chosen_elements_differ_from_the_base(
    apet_runs: dict[str, Path],
) -> None:
    root, base = apet_runs["root"], apet_runs["base"]
    original = load_file(base / "model.safetensors")
    merged = load_file(root / "merged" / "model.safetensors")
    tensors = load_file(root / "a" / "model.safetensors")
    changed = 0
    for key, before in original.items():
        after = merged.get(key, merged.get(f"bert.{key}"))
        if after is None or after.shape != before.shape:
            continue  # the new classification head
        differs = before != after
        changed += int(differs.sum())
        index = tensors.get(f"bert.{key.removesuffix('.weight')}.apet.index")
        allowed = torch.zeros(before.numel(), dtype=torch.bool)
        if index is not None:
            allowed[index] = True
        assert not bool((differs.reshape(-1) & ~allowed).any()), key
    assert 0 < changed <= 300


def test_load_model_runs_the_artifact_as_merged(apet_runs: dict[str, Path]) -> None:
    root = apet_runs["root"]
    scores = mposurgeon.evaluate(root / "a", data=EVAL).metrics
    merged = mposurgeon.evaluate(root / "merged", data=EVAL).metrics
    assert scores["accuracy"] == merged["accuracy"]
    assert scores["loss"] == pytest.approx(merged["loss"], abs=1e-6)


def test_bitfit_trains_biases_only(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tiny_classifier_dir("bert")
    out = tmp_path / "bitfit"
    result = mposurgeon.train(base, output=out, method="bitfit", data=TRAIN, max_steps=3, lr=1e-2)
    before = dict(seeded_classifier(base).named_parameters())
    after = mposurgeon.load_model(out)
    head = head_parameter_names(after)
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    assert changed - head and all(n.endswith(".bias") for n in changed - head), changed
    biases = sum(p.numel() for n, p in after.named_parameters() if n.endswith(".bias"))
    heads = sum(p.numel() for n, p in after.named_parameters() if n in head)
    assert result.metrics["trainable_params"] == biases + heads - sum(
        p.numel() for n, p in after.named_parameters() if n in head and n.endswith(".bias")
    )
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok


def test_bad_budgets_are_refused(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    base, out = tiny_classifier_dir("bert"), tmp_path / "o"
    args = ("train", base, "--data", TRAIN, "--max-steps", "1", "-o", out)
    for extra, needle in [
        (("--method", "apet", "--budget", "0"), "invalid option --budget"),
        (("--method", "apet", "--budget", "100000000"), "more than the"),
        (("--method", "lora", "--budget", "8"), "--budget 8 is below one rank"),
        (("--method", "lora", "--budget", "800", "--lora-r", "2"), "not both"),
        (("--method", "bitfit", "--budget", "8"), "--budget is not an option of method bitfit"),
    ]:
        assert_one_line_error(run_cli(capsys, *args, *extra), 2, needle)
        assert not out.exists()


@pytest.mark.parametrize(
    "options",
    [
        {"method": "apet", "budget": 300},
        {"method": "lora", "budget": 2000},
        {"method": "bitfit"},
        {"method": "full"},
    ],
    ids=lambda o: o["method"],
)
def test_dry_run_counts_what_training_trains_without_loading_weights(
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: dict,
) -> None:
    base = tiny_classifier_dir("bert")
    real = mposurgeon.train(base, output=tmp_path / "real", data=TRAIN, max_steps=1, **options)
    import transformers

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    workdir = tmp_path / "wd"
    dry = mposurgeon.train(base, workdir=workdir, data=TRAIN, dry_run=True, **options)
    assert dry.output is None and not workdir.exists()
    for key in ("trainable_params", "trainable_head", "total_params", "modules"):
        assert dry.metrics[key] == real.metrics[key], key


# -- adapter -----------------------------------------------------------------------------------


def test_adapters_start_as_the_base_model_and_count_exactly(minilm_dir: Path) -> None:
    """12 adapters (6 attention outputs, 6 FFN outputs) of width 384: size x 769 + 384 each."""
    from mposurgeon.methods.adapter.config import AdapterConfig

    model = seeded_classifier(minilm_dir)
    base = sample_logits(model, minilm_dir)
    method = get_method(AdapterConfig(adapter_size=16))
    records = method.prepare(model, {}, [])
    method.set_trainable(model)
    assert len(records) == 12 and _method_params(model) == 12 * (16 * 769 + 384) == 152_256
    assert torch.equal(sample_logits(model.eval(), minilm_dir), base)
    budget = method.config.model_copy(update={"adapter_size": None, "budget": 100_000})
    sized = get_method(budget).prepare(seeded_classifier(minilm_dir), {}, [])
    assert {r.size for r in sized.values()} == {10}  # type: ignore[attr-defined]
    assert sum(r.params for r in sized.values()) <= 100_000 < 12 * (11 * 769 + 384)


def test_an_adapter_artifact_runs_factorized_and_merge_refuses_it(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "adapter"
    result = mposurgeon.train(
        tiny_classifier_dir("bert"), output=out, method="adapter", adapter_size=4, data=TRAIN,
        eval_data=EVAL, max_steps=4, lr=1e-2,
    )  # fmt: skip
    assert result.metrics["modules"] == 4  # 2 layers x (attention output, FFN output)
    tensors = load_file(out / "model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if ".adapter.up." in k)
    again = mposurgeon.evaluate(out, data=EVAL).metrics
    assert again["accuracy"] == result.metrics["eval_accuracy"]
    assert again["loss"] == pytest.approx(result.metrics["eval_loss"], abs=1e-6)
    merged = tmp_path / "merged"
    result = run_cli(capsys, "merge", out, "-o", merged)
    assert_one_line_error(result, 2, "no dense weight can hold")
    assert not merged.exists()


def test_a_budget_named_by_a_method_is_what_that_method_would_train(minilm_dir: Path) -> None:
    """apet --budget lora --lora-r 4 trains exactly LoRA r=4's count (4 x 9,216); an adapter
    budgeted by lora r=8 takes the largest size that fits in 73,728."""
    common = dict(data=TRAIN, dry_run=True)
    apet = mposurgeon.train(minilm_dir, method="apet", budget="lora", lora_r=4, **common).metrics
    assert apet["trainable_params"] - apet["trainable_head"] == 4 * 9_216
    adapter = mposurgeon.train(minilm_dir, method="adapter", budget="lora", **common).metrics
    spent = adapter["trainable_params"] - adapter["trainable_head"]
    assert spent == 12 * (7 * 769 + 384) <= 73_728 < 12 * (8 * 769 + 384)
    with pytest.raises(Exception, match="--budget nope: a number, or a training method"):
        mposurgeon.train(minilm_dir, method="apet", budget="nope", **common)


@pytest.mark.parametrize("method", ["apet", "lora", "adapter"])
def test_an_interrupted_run_resumes_to_the_same_weights(
    method: str, tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """The method's layers are rebuilt from its options before the checkpoint is read."""
    from mposurgeon.stages.train import TrainingInterrupted
    from tests.cli_runner import stop_at_step

    base = tiny_classifier_dir("bert")
    common = dict(method=method, data=TRAIN, max_steps=6, batch_size=16, lr=1e-2, save_every=2)
    straight = mposurgeon.train(base, output=tmp_path / "straight", **common)
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(base, output=tmp_path / "resumed", progress=stop_at_step(5), **common)
    resumed = mposurgeon.train(base, output=tmp_path / "resumed", resume=True, **common)
    assert resumed.resumed_from_step == 4
    a, b = (
        load_file(straight.output / "model.safetensors"),
        load_file(resumed.output / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
