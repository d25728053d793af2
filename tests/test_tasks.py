"""Tasks beyond classification on tiny random models: causal-lm (GPT-2, Llama, BLOOM) and
seq2seq (T5, BART) with every MPO method, regression; task inference, encoding, the scores
against their reference formulas, exact match of generations, and the errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import mposurgeon
from mposurgeon.artifact.load import load_model
from mposurgeon.errors import DataError, UsageError
from mposurgeon.training.data import Columns, read_dataset
from mposurgeon.training.metrics import pearson, spearman
from mposurgeon.training.tasks import IGNORE, get_task
from tests.cli_runner import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SENTIMENT = REPO / "data" / "sentiment-train.jsonl"
#: Label words that the tiny tokenizers know (they cover the sentiment data's words).
WORDS = {"negative": "awful", "positive": "amazing"}
ROWS = 48


def _sentiment() -> list[dict]:
    lines = SENTIMENT.read_text(encoding="utf-8").splitlines()[:ROWS]
    return [json.loads(line) for line in lines]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small data sets of every task, built from the shipped sentiment rows."""
    root = tmp_path_factory.mktemp("task-data")
    rows = _sentiment()
    return {
        "text": _write(root / "text.jsonl", [{"text": r["text"]} for r in rows]),
        "prompt": _write(
            root / "prompt.jsonl",
            [{"prompt": r["text"], "completion": " " + WORDS[r["label"]]} for r in rows],
        ),
        "seq2seq": _write(
            root / "seq2seq.jsonl",
            [{"source": r["text"], "target": WORDS[r["label"]]} for r in rows],
        ),
        "regression": _write(
            root / "regression.jsonl",
            [
                {"text": r["text"], "label": (r["label"] == "positive") + 0.25 * (i % 3)}
                for i, r in enumerate(rows)
            ],
        ),
    }


@pytest.fixture(scope="module")
def decomposed(
    tiny_classifier_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Factory: the tiny model `arch` (with tokenizer) with FFN_1 and attention as MPO."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"task-dec-{arch}") / "dec"
            layers = ["FFN_1", "attention"]
            mposurgeon.decompose(tiny_classifier_dir(arch), output=out, layers=layers)
            cache[arch] = out
        return cache[arch]

    return get


# -- causal-lm and seq2seq with every MPO method -----------------------------------------------

GENERATIVE = [
    ("gpt2", "prompt", "lightweight"),
    ("gpt2", "text", "overparam"),
    ("gpt2", "prompt", "full"),
    ("llama", "prompt", "lightweight"),
    ("llama", "text", "overparam"),
    ("llama", "prompt", "full"),
    ("bloom", "prompt", "lightweight"),
    ("bloom", "prompt", "overparam"),
    ("bloom", "text", "full"),
    ("t5", "seq2seq", "lightweight"),
    ("t5", "seq2seq", "overparam"),
    ("t5", "seq2seq", "full"),
    ("bart", "seq2seq", "lightweight"),
    ("bart", "seq2seq", "overparam"),
    ("bart", "seq2seq", "full"),
]


@pytest.mark.parametrize(("arch", "kind", "method"), GENERATIVE)
def test_generative_training_lowers_the_loss_and_merges(
    arch: str,
    kind: str,
    method: str,
    decomposed: Callable[[str], Path],
    data: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The task is inferred (no labels: the model's LM task); the eval loss falls below the
    untrained artifact's; eval of the result repeats train's last evaluation; merge --verify
    passes and the merged checkpoint scores the same."""
    dec, rows = decomposed(arch), data[kind]
    task = "seq2seq" if arch in ("t5", "bart") else "causal-lm"
    before = mposurgeon.evaluate(dec, data=rows, batch_size=16).metrics
    out = tmp_path / "trained"
    result = mposurgeon.train(
        dec, output=out, method=method, data=rows, eval_data=rows, max_steps=8, batch_size=16
    )
    m = result.metrics
    assert m["task"] == task
    assert m["eval_loss"] < before["loss"], (before, m["eval"])
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
    assert m["eval_tokens"] == before["tokens"] > 0
    again = mposurgeon.evaluate(out, data=rows, batch_size=16).metrics
    assert again["tokens"] == m["eval_tokens"]
    assert again["loss"] == pytest.approx(m["eval_loss"], abs=1e-6)
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    dense = mposurgeon.evaluate(tmp_path / "merged", data=rows, batch_size=16).metrics
    assert dense["loss"] == pytest.approx(m["eval_loss"], abs=1e-4)


def test_token_loss_is_the_mean_over_every_predicted_token(
    decomposed: Callable[[str], Path], data: dict[str, Path]
) -> None:
    """eval's loss equals the model's own loss over all rows in one batch (the mean over
    predicted tokens, not over batches), whatever the batch size; only completion tokens
    count for prompt/completion rows."""
    dec = decomposed("gpt2")
    task = get_task("causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(dec)
    tokenizer.pad_token = tokenizer.eos_token
    model = load_model(dec, "causal-lm")
    dataset = read_dataset(data["prompt"], columns=Columns(generative="causal-lm"))
    rows = task.encode(dataset, tokenizer, 64)
    batch = task.collator(tokenizer, model)(rows)
    with torch.no_grad():
        reference = float(model(**batch).loss)
    completion_tokens = sum(
        len(tokenizer(" " + WORDS[r["label"]], add_special_tokens=False)["input_ids"]) + 1
        for r in _sentiment()
    )  # + EOS
    for batch_size in (5, 48):
        m = mposurgeon.evaluate(dec, data=data["prompt"], batch_size=batch_size).metrics
        assert m["tokens"] == completion_tokens == int((batch["labels"] != IGNORE).sum()) - 0
        assert m["loss"] == pytest.approx(reference, abs=1e-5)


def test_regression_is_inferred_from_fractional_labels_and_scored_by_formula(
    decomposed: Callable[[str], Path], data: dict[str, Path], tmp_path: Path
) -> None:
    dec = decomposed("bert")
    out = tmp_path / "reg"
    result = mposurgeon.train(
        dec, output=out, method="full", data=data["regression"], eval_data=data["regression"],
        max_steps=6, batch_size=16,
    )  # fmt: skip
    m = result.metrics
    assert m["task"] == "regression" and m["eval_loss"] is not None
    model = load_model(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    tokenizer = AutoTokenizer.from_pretrained(out)
    dataset = read_dataset(data["regression"])
    labels = torch.tensor(dataset.label_values(), dtype=torch.float64)
    enc = tokenizer([ex.text for ex in dataset.examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits[:, 0].double()
    assert m["eval_pearson"] == pytest.approx(pearson(preds, labels), abs=1e-6)
    assert m["eval_spearman"] == pytest.approx(spearman(preds, labels), abs=1e-6)
    assert m["eval_loss"] == pytest.approx(float(((preds - labels) ** 2).mean()), abs=1e-6)
    evaluated = mposurgeon.evaluate(out, data=data["regression"]).metrics
    assert evaluated["pearson"] == pytest.approx(m["eval_pearson"], abs=1e-9)
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok


def test_exact_match_counts_the_rows_whose_generation_is_the_reference(
    decomposed: Callable[[str], Path], data: dict[str, Path], tmp_path: Path
) -> None:
    """References equal to the model's own greedy output match (1.0); one token changed in
    half of them halves it; a generation cut by --max-new-tokens does not match."""
    dec = decomposed("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(dec)
    model = load_model(dec, "causal-lm")
    prompts, greedy = [], []
    for prompt in [r["text"] for r in _sentiment()]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        words = tokenizer.convert_ids_to_tokens(new)
        if None not in words:  # the random model's vocabulary is larger than the tokenizer's
            prompts.append(prompt)
            greedy.append("".join(" " + w for w in words))
    n = len(prompts)
    assert n >= 4
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, greedy, strict=True)]
    exact = _write(tmp_path / "exact.jsonl", rows)
    m = mposurgeon.evaluate(dec, data=exact, generate=True, max_new_tokens=3).metrics
    assert m["exact_match"] == 1.0 and m["generated_rows"] == n
    changed = [dict(r, completion=r["completion"] + " awful" * (i % 2)) for i, r in enumerate(rows)]
    half = _write(tmp_path / "half.jsonl", changed)
    m = mposurgeon.evaluate(dec, data=half, generate=True, max_new_tokens=3).metrics
    assert m["exact_match"] == (n - n // 2) / n
    short = mposurgeon.evaluate(dec, data=exact, generate=True, max_new_tokens=1).metrics
    longer = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) > 1 for c in greedy)
    assert short["exact_match"] == (n - longer) / n


def test_train_with_generate_records_exact_match(
    decomposed: Callable[[str], Path], data: dict[str, Path], tmp_path: Path
) -> None:
    result = mposurgeon.train(
        decomposed("t5"), output=tmp_path / "t", method="full", data=data["seq2seq"],
        eval_data=data["seq2seq"], max_steps=2, batch_size=16, generate=True, max_new_tokens=4,
    )  # fmt: skip
    m = result.metrics
    assert 0.0 <= m["eval_exact_match"] <= 1.0
    assert m["eval"][-1]["generated_rows"] == ROWS
    again = mposurgeon.evaluate(
        tmp_path / "t", data=data["seq2seq"], generate=True, max_new_tokens=4
    )
    assert again.metrics["exact_match"] == m["eval_exact_match"]


# -- reading data for a task --------------------------------------------------------------------


C = Columns
CLS, REG, LM, S2S = "classification", "regression", "causal-lm", "seq2seq"


@pytest.mark.parametrize(
    ("rows", "columns", "task", "fields"),
    [
        ([{"text": "a", "label": 1}, {"text": "b", "label": 0}], C(), CLS, ("a", None, 1)),
        ([{"text": "a", "label": 1.0}, {"text": "b", "label": 0}], C(), CLS, ("a", None, 1)),
        ([{"text": "a", "label": 0.5}, {"text": "b", "label": 2}], C(), REG, ("a", None, 0.5)),
        ([{"text": "a", "label": 1}], C(task=REG), REG, ("a", None, 1.0)),
        ([{"text": "a"}], C(generative=LM), LM, ("a", None, None)),
        ([{"prompt": "a", "completion": "b"}], C(generative=LM), LM, ("a", "b", None)),
        ([{"source": "a", "target": "b"}], C(generative=LM), LM, ("a", "b", None)),
        ([{"source": "a", "target": "b"}], C(generative=S2S), S2S, ("a", "b", None)),
        ([{"q": "a", "ans": "b"}], C(text="q", target="ans", task=S2S), S2S, ("a", "b", None)),
        ([{"text": "a", "label": 3}], C(task=LM), LM, ("a", None, None)),
    ],
)
def test_the_task_is_inferred_from_the_data_and_the_model(
    tmp_path: Path, rows: list[dict], columns: Columns, task: str, fields: tuple
) -> None:
    dataset = read_dataset(_write(tmp_path / "d.jsonl", rows), columns=columns)
    first = dataset.examples[0]
    assert dataset.task == task
    assert (first.text, first.target, first.label) == fields
    assert type(first.label) is type(fields[2])


def test_csv_decimal_labels_are_regression(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0.5\nb,2\nc,1e-1\n", encoding="utf-8")
    dataset = read_dataset(path)
    assert dataset.task == "regression" and dataset.label_values() == [0.5, 2.0, 0.1]


@pytest.mark.parametrize(
    ("rows", "columns", "needle"),
    [
        ([{"text": "a"}], C(), "d.jsonl: no label column 'label' (columns: text); data without"),
        ([{"text": "a"}], C(generative=S2S), "d.jsonl: seq2seq data needs the columns"),
        ([{"source": "a"}], C(generative=S2S), "seq2seq data needs the columns"),
        ([{"prompt": "a", "completion": 3}], C(generative=LM), "line 1: 'completion' must be a"),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
            C(generative=LM),
            "line 2: missing 'completion'",
        ),
        (
            [{"text": "a", "label": "x"}, {"text": "b", "label": 0.5}],
            C(task=REG),
            "line 1: label 'x' is not a number",
        ),
        (
            [{"text": "a", "label": 0.5}, {"text": "b", "label": 1}],
            C(task=CLS),
            "line 1: label 0.5 is not a class",
        ),
        ([{"q": "a"}], C(text="q", target="ans", task=S2S), "no column 'ans'"),
    ],
)
def test_data_that_does_not_fit_the_task_is_a_one_line_error(
    tmp_path: Path, rows: list[dict], columns: Columns, needle: str
) -> None:
    with pytest.raises(DataError) as info:
        read_dataset(_write(tmp_path / "d.jsonl", rows), columns=columns)
    assert needle in str(info.value) and "\n" not in str(info.value), info.value


def test_a_prompt_that_fills_max_length_is_named(
    decomposed: Callable[[str], Path], data: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=r"prompt\.jsonl line 1: the prompt fills --max-length 4"):
        mposurgeon.train(
            decomposed("gpt2"), output=tmp_path / "o", method="full", data=data["prompt"],
            max_steps=1, max_length=4,
        )  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_task_and_model_mismatches_are_refused(
    decomposed: Callable[[str], Path],
    data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bert, gpt2 = decomposed("bert"), decomposed("gpt2")
    out = tmp_path / "o"
    cases = [
        ((bert, "--data", data["text"], "--task", "causal-lm"), 2, "has no causal-lm head"),
        ((bert, "--data", data["text"]), 1, "no label column 'label'"),
        ((gpt2, "--data", data["seq2seq"], "--task", "seq2seq"), 2, "has no seq2seq head"),
        ((gpt2, "--data", data["text"], "--task", "ranking"), 2, "--task"),
        ((gpt2, "--data", data["prompt"], "--generate"), 2, "--generate scores the eval data"),
        (
            (gpt2, "--data", data["text"], "--eval-data", data["text"], "--generate"),
            2,
            "has none (plain text)",
        ),
        (
            (bert, "--data", data["regression"], "--eval-data", data["regression"], "--generate"),
            2,
            "not regression",
        ),
    ]
    for args, code, needle in cases:
        result = run_cli(capsys, "train", *args, "--method", "full", "-o", out, "--max-steps", "1")
        assert_one_line_error(result, code, needle)
        assert not out.exists()


def test_eval_task_must_match_the_head(
    decomposed: Callable[[str], Path], data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gpt2 = decomposed("gpt2")
    result = run_cli(capsys, "eval", gpt2, "--data", data["text"], "--task", "seq2seq")
    assert_one_line_error(result, 2, "has a causal-lm head: --task seq2seq does not apply")
    with pytest.raises(UsageError, match=r"has none \(plain text\)"):
        mposurgeon.evaluate(decomposed("gpt2"), data=data["text"], generate=True)


def test_cli_trains_a_causal_lm_and_shows_its_scores(
    decomposed: Callable[[str], Path],
    data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "lm"
    args = ("--data", data["prompt"], "--eval-data", data["prompt"], "--max-steps", "2")
    args = (*args, "--method", "lightweight", "-o", out, "-q")
    result = run_cli(capsys, "train", decomposed("llama"), *args)
    assert result.code == 0, result
    assert "task causal-lm" in result.out and "eval (causal-lm): loss" in result.out
    assert "perplexity" in result.out and f"({ROWS} rows, " in result.out
    shown = run_cli(capsys, "eval", out, "--data", data["prompt"], "--json")
    assert shown.code == 0, shown
    assert json.loads(shown.out)["task"] == "causal-lm"
