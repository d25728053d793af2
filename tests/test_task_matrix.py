"""Tasks across architectures and methods: regression on all 9 architectures, and the
parameter-efficient methods on causal-lm and seq2seq; each trains, runs factorized, and merges
(`--verify`) where the method has a dense form."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import mposurgeon
from mposurgeon.methods.registry import get_method
from tests.conftest import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SENTIMENT = REPO / "data" / "sentiment-train.jsonl"


def _rows() -> list[dict]:
    lines = SENTIMENT.read_text(encoding="utf-8").splitlines()[:32]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix-data")
    words = {"negative": "awful", "positive": "amazing"}
    sets = {
        "regression": [
            {"text": r["text"], "label": (r["label"] == "positive") + 0.25 * (i % 3)}
            for i, r in enumerate(_rows())
        ],
        "causal-lm": [
            {"prompt": r["text"], "completion": " " + words[r["label"]]} for r in _rows()
        ],
        "seq2seq": [{"source": r["text"], "target": words[r["label"]]} for r in _rows()],
    }
    out = {}
    for name, rows in sets.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out[name] = path
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_regression_trains_and_merges_on_every_architecture(
    arch: str, tiny_classifier_dir: Callable[[str], Path], data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "reg"
    result = mposurgeon.train(
        tiny_classifier_dir(arch), output=out, method="full", data=data["regression"],
        eval_data=data["regression"], max_steps=2, batch_size=16,
    )  # fmt: skip
    assert result.metrics["task"] == "regression"
    assert result.metrics["eval_pearson"] is not None
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    scores = mposurgeon.evaluate(tmp_path / "merged", data=data["regression"]).metrics
    assert scores["loss"] == pytest.approx(result.metrics["eval_loss"], abs=1e-4)


@pytest.mark.parametrize(
    ("arch", "task", "method", "options"),
    [
        ("gpt2", "causal-lm", "lora", {}),
        ("gpt2", "causal-lm", "dsee", {}),
        ("llama", "causal-lm", "adapter", {"adapter_size": 4}),
        ("bloom", "causal-lm", "apet", {"budget": 200}),
        ("t5", "seq2seq", "lora", {"layers": "attention"}),
        ("bart", "seq2seq", "bitfit", {}),
        ("t5", "seq2seq", "apet", {"budget": 200}),
        ("gpt2", "causal-lm", "ia3", {}),
        ("t5", "seq2seq", "ia3", {}),
        ("llama", "causal-lm", "prompt-tuning", {"num_virtual_tokens": 4}),
        ("bart", "seq2seq", "prompt-tuning", {"num_virtual_tokens": 4}),
        ("gpt2", "causal-lm", "prefix-tuning", {"num_virtual_tokens": 4}),
        ("bart", "seq2seq", "prefix-tuning", {"num_virtual_tokens": 4}),
    ],
)
def test_parameter_efficient_methods_train_language_models(
    arch: str,
    task: str,
    method: str,
    options: dict,
    tiny_classifier_dir: Callable[[str], Path],
    data: dict[str, Path],
    tmp_path: Path,
) -> None:
    base = tiny_classifier_dir(arch)
    before = mposurgeon.evaluate(base, data=data[task]).metrics["loss"]
    out = tmp_path / "trained"
    result = mposurgeon.train(
        base, output=out, method=method, data=data[task], eval_data=data[task], max_steps=6,
        batch_size=16, lr=1e-2, **options,
    )  # fmt: skip
    m = result.metrics
    assert m["task"] == task and m["eval_loss"] < before
    again = mposurgeon.evaluate(out, data=data[task]).metrics
    assert again["loss"] == pytest.approx(m["eval_loss"], abs=1e-6)
    if get_method(method).has_dense_form:
        merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
        assert merged.comparison is not None and merged.comparison.ok
