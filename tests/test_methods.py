"""The method layer: the registry, `train --method`, and a new method plugged in by
registering it (no stage, manifest or CLI code names a method)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import Field
from torch import nn

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods import registry
from mposurgeon.methods.base import Method, head_parameter_names
from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.methods.registry import (
    get_method,
    method_config,
    method_names,
    methods_help,
    record_class,
)
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"


# -- the registry ----------------------------------------------------------------------------


def test_registry_holds_the_training_methods_and_the_mpo_state() -> None:
    trained = ["full", "lightweight", "overparam", "lora", "dsee", "ia3", "prompt-tuning"]
    trained += ["prefix-tuning", "bitfit", "apet", "adapter", "mpoe"]
    assert method_names(training=True) == trained
    assert method_names() == [*trained, "mpo"]
    for name in method_names():
        config = method_config(name)
        method = get_method(name)
        assert isinstance(method, Method) and method.name == name
        assert method.config_class is config and isinstance(method.config, config)
        assert config.summary and "\n" not in config.summary
    assert record_class("mpo") is MPORecord
    assert record_class("mpoe") is MPOERecord
    assert record_class("lightweight") is None and record_class("nope") is None


def test_each_method_declares_its_measured_learning_rate() -> None:
    """The defaults of benchmarks/RESULTS.md (man-sections sweep): a config field default."""
    lrs = {name: method_config(name).default("lr") for name in method_names(training=True)}
    assert lrs == {
        "full": 2e-4, "lightweight": 5e-4, "overparam": 1e-4,
        "lora": 2e-3, "dsee": 2e-3, "ia3": 1e-2, "prompt-tuning": 3e-2, "prefix-tuning": 1e-1,
        "bitfit": 1e-2, "apet": 1e-2,
        "adapter": 3e-3,
        "mpoe": 1e-4,  # man-sections, 4 experts: 0.874 at 5e-5, 0.894 at 1e-4, 0.883 at 2e-4
    }  # fmt: skip
    assert get_method("lightweight").config.lr == 5e-4


def test_unknown_and_state_only_methods_are_refused_by_name() -> None:
    with pytest.raises(mposurgeon.errors.UsageError, match="'dora' is not a known method"):
        method_config("dora")
    with pytest.raises(mposurgeon.errors.UsageError, match="'mpo' is not a training method"):
        method_config("mpo", training=True)


def test_registry_and_configs_import_without_torch() -> None:
    """`mposurgeon --help` lists the methods: configs and registry must not import torch."""
    code = (
        "import sys\n"
        "import mposurgeon.methods.registry as r\n"
        "r.methods_help(); r.record_class('mpo')\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "NO-TORCH", out.stderr


# -- train --method --------------------------------------------------------------------------


def test_train_help_lists_every_training_method_on_its_own_line(capsys) -> None:
    result = run_cli(capsys, "train", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    for line in methods_help():
        assert " ".join(line.split()) in text, line
    assert "--method" in text and "--mode" in text


ALL_TRAINING = (
    "full, lightweight, overparam, lora, dsee, ia3, prompt-tuning, prefix-tuning, bitfit, apet, "
    "adapter"
)


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (("--method", "dora"), ("unknown method 'dora'", ALL_TRAINING)),
        (("--method", "mpo"), ("unknown method 'mpo'", ALL_TRAINING)),
        (("--mode", "lightweight", "--method", "full"), ("disagree",)),
        (("--method", "lightweight", "--num-cores", "4"), ("--num-cores is not an option",)),
        ((), ("method",)),
    ],
)
def test_bad_method_flags_are_one_line_usage_errors(
    tiny_mpo: Path,
    tmp_path: Path,
    capsys,
    flags: tuple[str, ...],
    needles: tuple[str, ...],
) -> None:
    out = tmp_path / "out"
    result = run_cli(capsys, "train", tiny_mpo, "-o", out, "--data", TRAIN, *flags)
    assert_one_line_error(result, 2, *needles)
    assert not out.exists()


def test_mode_is_the_older_name_of_method(tiny_mpo: Path, tmp_path: Path) -> None:
    """Same input, seed and steps: --mode and --method train the very same weights, and the
    manifest records the method either way."""
    common = dict(data=TRAIN, max_steps=2, batch_size=8)
    a = mposurgeon.train(tiny_mpo, output=tmp_path / "a", mode="lightweight", **common)
    b = mposurgeon.train(tiny_mpo, output=tmp_path / "b", method="lightweight", **common)
    assert a.metrics["method"] == b.metrics["method"] == "lightweight"
    assert a.metrics["final_loss"] == b.metrics["final_loss"]
    for out in (a.output, b.output):
        options = read_manifest(out).options
        assert options["method"] == "lightweight" and "mode" not in options
    from safetensors.torch import load_file

    wa, wb = load_file(a.output / "model.safetensors"), load_file(b.output / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- a new method, added by writing it and registering it --------------------------------------


class BiasOnlyConfig(MethodConfig):
    """A BitFit-like method written for this test: biases and the head train."""

    name: ClassVar[str] = "bias-only"
    summary: ClassVar[str] = "biases and the task head train (a test method)"
    implementation: ClassVar[str] = f"{__name__}:BiasOnlyMethod"

    lr: float = Field(1e-2, gt=0)


class BiasOnlyMethod(Method):
    config_class: ClassVar[type[BiasOnlyConfig]] = BiasOnlyConfig

    def set_trainable(self, model: nn.Module) -> None:
        head = head_parameter_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name in head)


@pytest.fixture
def bias_only_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(registry, "REGISTERED", (*registry.REGISTERED, BiasOnlyConfig))
    monkeypatch.setattr(registry, "_BY_NAME", {**registry._BY_NAME, "bias-only": BiasOnlyConfig})
    yield


@pytest.mark.usefixtures("bias_only_registered")
def test_a_registered_method_trains_and_merges_without_stage_changes(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    base = tiny_classifier_dir("bert")
    out = tmp_path / "tuned"
    result = run_cli(
        capsys, "train", base, "-o", out, "--method", "bias-only", "--data", TRAIN,
        "--max-steps", "3", "--batch-size", "8", "--json",
    )  # fmt: skip
    assert result.code == 0, result
    metrics = json.loads(result.out)["metrics"]
    assert metrics["method"] == "bias-only" and metrics["lr"] == 1e-2
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    from transformers import AutoModelForSequenceClassification

    before = dict(AutoModelForSequenceClassification.from_pretrained(base).named_parameters())
    after = mposurgeon.load_model(out)
    head = head_parameter_names(after)
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith(".bias") for n in changed - head)
    assert all(n.endswith(".bias") for n in changed - head), changed - head
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok


def test_a_method_without_a_dense_form_refuses_to_merge_saying_what_to_do() -> None:
    record = get_method("mpo").config_class.record  # any record: the method decides, not it
    assert record is MPORecord
    rec = MPORecord(
        name="enc.fc", kind="linear", weight_key="enc.fc.weight", shape=[4, 4], dtype="float32",
        out_dim=4, in_dim=4, out_modes=[2, 2], in_modes=[2, 2], out_padding=0, in_padding=0,
        bonds=[1, 4, 1], central_index=0, params=32, dense_params=16,
    )  # fmt: skip
    with pytest.raises(mposurgeon.errors.UsageError, match="no dense weight can hold") as err:
        BiasOnlyMethod().to_dense(rec, {})
    assert "load_model" in (err.value.hint or "")


def test_target_modules_take_peft_lists_of_names(tiny_model_dir) -> None:
    """PEFT's list form: each name matches modules whose whole name is it or ends with it."""
    src = tiny_model_dir("bert")
    listed = mposurgeon.decompose(src, target_modules=["query", "value"], dry_run=True)
    regex = mposurgeon.decompose(src, target_modules=r".*\.(query|value)", dry_run=True)
    names = [m.target.name for m in listed.modules]
    assert names == [m.target.name for m in regex.modules] and len(names) == 4
    config = method_config("lora")(target_modules=("query",))
    assert re.fullmatch(str(config.target_modules), "encoder.layer.0.attention.self.query")
    assert not re.fullmatch(str(config.target_modules), "encoder.layer.0.attention.self.queryx")
    with pytest.raises(ValueError, match="module names"):
        method_config("lora")(target_modules=[])
