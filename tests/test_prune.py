"""The prune stage and command: exact sparsity, zeros through train and merge, FFN neurons and
heads removed (reloading as the smaller model) or masked, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.models.pruning import mask_key
from tests.cli_runner import assert_one_line_error, run_cli

DATA = Path(__file__).resolve().parent.parent / "data"
TRAIN = DATA / "sentiment-train.jsonl"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _params(path: Path) -> int:
    return sum(t.numel() for k, t in _tensors(path).items() if ".prune." not in k)


# --- unstructured ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_bert(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "sparse"
    mposurgeon.prune(tiny_classifier_dir("bert"), output=out, sparsity=0.5)
    return out


def test_sparsity_zeroes_exactly_half_of_each_matrix(
    tiny_classifier_dir: Callable[[str], Path], sparse_bert: Path
) -> None:
    before, after = _tensors(tiny_classifier_dir("bert")), _tensors(sparse_bert)
    pruning = read_manifest(sparse_bert).pruning  # type: ignore[attr-defined]
    targeted = {f"{name}.weight" for name in pruning["matrices"]}
    assert len(targeted) == 2 * 6  # q, k, v, o, FFN_1, FFN_2 per layer
    for key, w in before.items():
        if key in targeted:
            mask = after[mask_key(key)]
            assert mask.dtype == torch.bool and int(mask.sum()) == round(0.5 * w.numel())
            assert int((after[key] == 0).sum()) == round(0.5 * w.numel())
            assert torch.equal(after[key][~mask], w[~mask])  # the kept weights are unchanged
            assert after[key][~mask].abs().min() >= w[mask].abs().max()  # the smallest went
        else:
            assert torch.equal(after[key], w), key  # untargeted: bitwise unchanged
            assert mask_key(key) not in after


def test_global_sparsity_counts_in_total(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("gpt2")
    result = mposurgeon.prune(src, output=tmp_path / "g", sparsity=0.3, global_scope=True)
    after = _tensors(tmp_path / "g")
    total = sum(m.numel for m in result.matrices)
    zeros = sum(int((after[f"{m.name}.weight"] == 0).sum()) for m in result.matrices)
    assert zeros == result.pruned == round(0.3 * total)
    per = [m.sparsity for m in result.matrices]
    assert max(per) - min(per) > 0.01  # global: matrices differ


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zeros_survive_train_and_merge(sparse_bert: Path, tmp_path: Path, method: str) -> None:
    masks = {k: v for k, v in _tensors(sparse_bert).items() if ".prune." in k}
    trained = tmp_path / "trained"
    mposurgeon.train(
        sparse_bert, output=trained, method=method, data=TRAIN, max_steps=3, batch_size=16,
        lr=5e-2, layers="attention" if method == "lora" else None,
    )  # fmt: skip
    merged = tmp_path / "merged"
    result = mposurgeon.merge(trained, output=merged, verify=True)  # load_model masks too
    assert result.comparison is not None and result.comparison.ok
    scores = mposurgeon.evaluate(trained, data=TRAIN).metrics
    assert scores["loss"] == pytest.approx(mposurgeon.evaluate(merged, data=TRAIN).metrics["loss"])
    dense = _tensors(merged)
    trained_tensors = _tensors(trained)
    assert not any(".prune." in k for k in dense)  # a plain checkpoint
    changed = 0
    for key, mask in masks.items():
        weight_key = "bert." + key.replace(".prune.weight_mask", ".weight")
        assert weight_key in dense, weight_key
        assert torch.equal(trained_tensors[mask_key(weight_key)], mask)
        merged_w = dense[weight_key]
        assert bool((merged_w[mask] == 0).all()), weight_key  # pruned: exact zeros
        original = _tensors(sparse_bert)[key.replace(".prune.weight_mask", ".weight")]
        changed += int(not torch.equal(merged_w[~mask], original[~mask]))
    assert changed > 0  # training did change the kept weights
    from mposurgeon.stages.inspect import inspect

    rows = inspect(merged)["modules"]  # a checkpoint merged from a pruned one: sparsity shown
    query = next(m for m in rows if m["name"].endswith("layer.0.attention.self.query.weight")
                 or m["name"].endswith("layer.0.attention.self.query"))  # fmt: skip
    assert query["sparsity"] == 0.5


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora", {"layers": "attention"}),  # W + B A: the update is dense
        ("dsee", {"sparse_size": 64, "sparse_init": "random"}),  # its support may hit zeros
        ("apet", {"budget": 4000}),  # a sparse delta over random entries
        ("lightweight", {}),  # MPO cores of a pruned matrix
    ],
)
def test_training_sees_the_weights_merge_writes(
    sparse_bert: Path, tmp_path: Path, method: str, options: dict[str, object]
) -> None:
    """Every method trains the pruned merged weight: the live model's final evaluation equals
    that of the artifact (`load_model`) and of its merged checkpoint, and the updates on the
    pruned entries got no gradient."""
    source = sparse_bert
    if method == "lightweight":
        source = tmp_path / "mpo"
        mposurgeon.decompose(sparse_bert, output=source, layers="attention")
    trained = tmp_path / "trained"
    result = mposurgeon.train(
        source, output=trained, method=method, data=TRAIN, eval_data=TRAIN, max_steps=4,
        batch_size=16, lr=5e-2, seed=1, **options,
    )  # fmt: skip
    live = result.metrics["eval_loss"]
    assert mposurgeon.evaluate(trained, data=TRAIN).metrics["loss"] == pytest.approx(live, 1e-5)
    merged = tmp_path / "merged"
    mposurgeon.merge(trained, output=merged)
    assert mposurgeon.evaluate(merged, data=TRAIN).metrics["loss"] == pytest.approx(live, 1e-5)
    tensors = _tensors(trained)
    for key, mask in tensors.items():
        if key.endswith(".dsee.index") or key.endswith(".apet.index"):
            module = key.rsplit(".", 2)[0]
            pruned = tensors[mask_key(f"{module}.weight")].reshape(-1)[mask]
            values = tensors[key.replace(".index", ".values")]
            assert pruned.any() and bool((values[pruned] == 0).all()), key


def test_inspect_reports_sparsity(sparse_bert: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "inspect", sparse_bert, "--json")
    report = json.loads(result.out)
    rows = {m["name"]: m for m in report["modules"]}
    q = rows["encoder.layer.0.attention.self.query"]
    assert q["sparsity"] == 0.5 and q["zeros"] == 32 * 32 // 2
    assert rows["embeddings.word_embeddings"]["sparsity"] < 0.01
    assert report["pruning"]["mode"] == "unstructured"
    text = run_cli(capsys, "inspect", sparse_bert).out
    with_zeros = sum(1 for m in report["modules"] if m["zeros"])  # 12 + the padding row
    assert f"sparsity: {with_zeros} of 16 matrices" in " ".join(text.split())


# --- structured: FFN neurons ------------------------------------------------------------------


def test_ffn_neurons_on_minilm(minilm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ffn"
    result = mposurgeon.prune(minilm_dir, output=out, ffn_neurons=512)
    assert AutoConfig.from_pretrained(out).intermediate_size == 1024
    assert _params(minilm_dir) - _params(out) == 6 * 512 * (2 * 384 + 1)
    assert result.units[0].params_removed == 6 * 512 * (2 * 384 + 1)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    reloaded = AutoModel.from_pretrained(out).eval()
    artifact = mposurgeon.load_model(out)
    dense = AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        for i, drop in enumerate(result.units[0].per_block.values()):
            layer = dense.encoder.layer[i]
            layer.intermediate.dense.weight[drop] = 0
            layer.intermediate.dense.bias[drop] = 0
            layer.output.dense.weight[:, drop] = 0
        got = reloaded(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, artifact(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(
            got, dense(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-4
        )
    merged = mposurgeon.merge(out, output=tmp_path / "merged").output
    assert _params(merged) == _params(out)
    assert (merged / "model.safetensors").stat().st_size < (
        minilm_dir / "model.safetensors"
    ).stat().st_size


# --- structured: heads ------------------------------------------------------------------------


def test_fisher_removes_the_neurons_of_least_squared_gradient(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """--score fisher with batches of one row: the neurons removed are, per layer, those whose
    FFN weights have the smallest sum over rows of squared loss gradients, computed here on
    the same model, one row at a time."""
    from mposurgeon.training.data import read_dataset
    from mposurgeon.training.model import training_model
    from mposurgeon.training.tasks import get_task

    src = tiny_classifier_dir("bert")
    result = mposurgeon.prune(
        src, output=tmp_path / "f", ffn_neurons=5, score="fisher", data=TRAIN, batch_size=1,
        max_batches=10_000,
    )  # fmt: skip
    dataset = read_dataset(TRAIN)
    task = get_task(dataset.task)
    setup = training_model(src, is_artifact=False, task=task, data=dataset, seed=0)
    net = setup.model.eval()
    rows = task.encode(dataset, setup.tokenizer, 128)
    collate = task.collator(setup.tokenizer, net)
    layers = net.bert.encoder.layer
    fisher = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64)
              for layer in layers]  # fmt: skip
    for row in rows:
        net.zero_grad(set_to_none=True)
        net(**collate([row])).loss.backward()
        for i, layer in enumerate(layers):
            up, down = layer.intermediate.dense.weight.grad, layer.output.dense.weight.grad
            fisher[i] += up.double().square().sum(1) + down.double().square().sum(0)
    (units,) = result.units
    assert len(units.per_block) == len(fisher), units.per_block
    for i, (name, dropped) in enumerate(units.per_block.items()):
        assert name.endswith(f".layer.{i}"), name
        scores = fisher[i]
        expected = sorted(torch.sort(scores, stable=True).indices[:5].tolist())
        assert dropped == expected, name
    magnitude = mposurgeon.prune(src, output=tmp_path / "m", ffn_neurons=5).units[0].per_block
    assert magnitude != units.per_block  # the scores do rank differently


def test_llama_heads_removed_by_the_formula(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    out = tmp_path / "heads"
    result = mposurgeon.prune(src, output=out, heads=1)
    config = AutoConfig.from_pretrained(out)
    # 4 query heads in 2 key/value groups: one group goes, with its 2 query heads
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    hidden, dim, layers = 32, 8, 2
    per_layer = 2 * dim * hidden + dim * hidden + dim * hidden + hidden * 2 * dim
    assert _params(src) - _params(out) == layers * per_layer == result.units[0].params_removed
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for i, (group,) in enumerate(result.units[0].per_block.values()):
            attn = dense.model.layers[i].self_attn
            q = slice(group * 2 * dim, (group + 1) * 2 * dim)
            attn.q_proj.weight[q] = 0
            attn.o_proj.weight[:, q] = 0
            # masked heads: zero o columns remove their output whatever their attention
        torch.testing.assert_close(
            small(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )


def test_minilm_heads_are_masked(
    minilm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "heads"
    result = run_cli(capsys, "prune", minilm_dir, "--heads", "2", "-o", out)
    assert result.code == 0, result
    assert "masked (not removed" in result.out
    after = _tensors(out)
    per_layer = 0
    for key, mask in after.items():
        if key.startswith("encoder.layer.0.") and ".prune." in key:
            per_layer += int(mask.sum())
    assert per_layer == 2 * 49_248
    manifest = read_manifest(out).pruning  # type: ignore[attr-defined]
    assert manifest["heads"]["masked"] and manifest["heads"]["weights_masked"] == 6 * 2 * 49_248
    assert AutoConfig.from_pretrained(out).num_attention_heads == 12


def test_dry_run_writes_nothing(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dry"
    result = run_cli(
        capsys, "prune", tiny_model_dir("bert"), "--ffn-neurons", "4", "--dry-run", "-o", out
    )
    assert result.code == 0 and "would remove 4 of 64 FFN neurons" in result.out
    assert not out.exists()


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--sparsity", "1.5"], 2, "sparsity"),
        (["--heads", "4"], 2, "--heads 4"),
        (["--heads", "1", "--score", "fisher"], 2, "--data"),
        (["--sparsity", "0.5", "--layers", "FFN_9"], 2, "FFN_9"),
        ([], 2, "nothing to prune"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tiny_model_dir, tmp_path: Path, capsys, args: list[str], code: int, needle: str
) -> None:
    out = tmp_path / "out"
    result = run_cli(capsys, "prune", tiny_model_dir("bert"), *args, "-o", out)
    assert_one_line_error(result, code, needle)
    assert not out.exists()


def test_missing_path_and_existing_output(tiny_model_dir, tmp_path: Path, capsys) -> None:
    result = run_cli(
        capsys, "prune", tmp_path / "nowhere", "--sparsity", "0.5", "-o", tmp_path / "o"
    )
    assert result.code == 4 and len(result.err.strip().splitlines()) == 1
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("x")
    result = run_cli(capsys, "prune", tiny_model_dir("bert"), "--sparsity", "0.5", "-o", out)
    assert result.code != 0 and len(result.err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["x"]
