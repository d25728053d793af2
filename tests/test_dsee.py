"""`train --method dsee`: a LoRA update plus a sparse update on a fixed support of N entries
per matrix. Exact parameter counts (r x (in + out) + N per matrix), the model at
initialization is the base model, the sparse update stays on its support (godec, magnitude,
random), merge folds W + (alpha / r) B A + S, load_model runs the artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods.base import head_parameter_names
from mposurgeon.methods.dsee.config import DseeConfig
from mposurgeon.methods.dsee.record import DseeRecord
from mposurgeon.methods.dsee.support import godec_support, magnitude_support, random_support
from mposurgeon.methods.registry import get_method
from mposurgeon.models.orientation import as_weight
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import sample_logits, seeded_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
EVAL = REPO / "data" / "sentiment-eval.jsonl"
INITS = ("godec", "magnitude", "random")


def _method_params(model: torch.nn.Module) -> int:
    head = head_parameter_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)


# -- counts and the model at initialization ------------------------------------------------------


def test_minilm_defaults_train_r_x_in_plus_out_plus_n_per_query_and_value(
    minilm_dir: Path,
) -> None:
    """Defaults: r 16, alpha 32, N 64 on query and value of 6 layers (the paper's; 12
    matrices of 384 x 384): 12 x (16 x (384 + 384) + 64) = 148,224. B and S start at zero:
    the logits are the base model's, bit for bit."""
    model = seeded_classifier(minilm_dir)
    base = sample_logits(model, minilm_dir)
    method = get_method("dsee")
    records = method.prepare(model, {}, [])
    method.set_trainable(model)
    assert len(records) == 12
    expected = sum(16 * (384 + 384) + 64 for _ in records)
    assert expected == 148_224 == _method_params(model) == sum(r.params for r in records.values())
    assert {n.rsplit(".", 1)[-1] for n in records} == {"query", "value"}
    assert all(isinstance(r, DseeRecord) and r.alpha == 32 for r in records.values())
    assert torch.equal(sample_logits(model.eval(), minilm_dir), base)


def test_minilm_dry_run_counts_the_formula_on_the_meta_device(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GoDec cannot run on meta tensors: the dry run skips the choice of support, and counts
    r x (in + out) + N per matrix all the same (here r 8, N 100, FFN_1: 6 x 1536 x 384)."""
    import transformers

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    dry = mposurgeon.train(
        minilm_dir, workdir=tmp_path / "wd", data=TRAIN, dry_run=True, method="dsee",
        lora_r=8, sparse_size=100, layers="FFN_1",
    )  # fmt: skip
    m = dry.metrics
    assert m["modules"] == 6
    assert m["trainable_params"] - m["trainable_head"] == 6 * (8 * (1536 + 384) + 100) == 92_760
    assert m["method_options"]["sparse_init"] == "godec" and not (tmp_path / "wd").exists()


@pytest.mark.parametrize("init", INITS)
def test_the_support_holds_n_distinct_positions_per_matrix_and_the_model_starts_as_the_base(
    tiny_classifier_dir: Callable[[str], Path], init: str
) -> None:
    base_dir = tiny_classifier_dir("bert")
    model = seeded_classifier(base_dir)
    base = sample_logits(model, base_dir)
    weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")
    }
    method = get_method(DseeConfig(lora_r=4, sparse_size=50, sparse_init=init))
    records = method.prepare(model, {}, [])
    assert len(records) == 4  # 2 layers x query and value (32 x 32)
    state = {method.file_key(k): v for k, v in model.state_dict().items()}
    for name in records:
        index = state[f"{name}.dsee.index"]
        assert index.dtype == torch.int64 and index.numel() == 50
        assert index.unique().numel() == 50 and torch.equal(index, index.sort().values)
        assert int(index.min()) >= 0 and int(index.max()) < 32 * 32
        assert torch.equal(state[f"{name}.dsee.values"], torch.zeros(50))
        if init == "magnitude":
            assert torch.equal(index, magnitude_support(weights[name], 50))
    assert torch.equal(sample_logits(model.eval(), base_dir), base)


def test_random_supports_follow_the_runs_seed(tiny_classifier_dir: Callable[[str], Path]) -> None:
    def support(seed: int) -> dict[str, torch.Tensor]:
        model = seeded_classifier(tiny_classifier_dir("bert"))
        method = get_method(DseeConfig(lora_r=2, sparse_size=20, sparse_init="random"))
        torch.manual_seed(seed)
        method.prepare(model, {}, [])
        return {k: v for k, v in model.state_dict().items() if k.endswith(".0.index")}

    a, b, c = support(0), support(0), support(1)
    assert a.keys() == b.keys() == c.keys() and len(a) == 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_random_support_draws_size_distinct_positions_under_its_generator() -> None:
    for numel, size in [(1, 1), (10, 10), (1024, 50), (10**8, 64), (37, 36)]:
        found = random_support(numel, size, torch.Generator().manual_seed(numel))
        assert found.numel() == size == found.unique().numel()
        assert torch.equal(found, found.sort().values)
        assert int(found.min()) >= 0 and int(found.max()) < numel
        again = random_support(numel, size, torch.Generator().manual_seed(numel))
        assert torch.equal(found, again)
    draws = [random_support(5, 2, torch.Generator().manual_seed(s)).tolist() for s in range(400)]
    assert len({tuple(d) for d in draws}) == 10  # every pair of 5 positions comes up


# -- GoDec -----------------------------------------------------------------------------------------


def test_godec_finds_the_spikes_of_a_low_rank_plus_sparse_matrix_where_magnitude_does_not() -> None:
    """W = U V (rank 4, entries up to ~10) + 30 spikes of +-4: the largest |W| are entries of
    the low-rank part, the sparse part of the split is the spikes."""
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(120, 4, generator=generator) @ torch.randn(4, 80, generator=generator)
    spikes = torch.randperm(120 * 80, generator=generator)[:30].sort().values
    signs = torch.randint(0, 2, (30,), generator=generator) * 2 - 1
    weight = low.reshape(-1).index_add(0, spikes, 4.0 * signs.float()).view(120, 80)
    found = godec_support(weight, 4, 30)
    assert torch.equal(found, spikes)
    assert torch.equal(godec_support(weight.t().contiguous(), 4, 30).sort().values,
                       (spikes % 80 * 120 + spikes // 80).sort().values)  # fmt: skip
    by_magnitude = magnitude_support(weight, 30)
    assert len(set(by_magnitude.tolist()) & set(spikes.tolist())) < 15
    assert float(low.abs().max()) > 4.0 * 1.5


def test_godec_of_a_1536_x_384_matrix_gives_n_distinct_positions() -> None:
    """(Its time is no test's business: 0.16-0.3 s on one busy core, measured by hand.)"""
    weight = torch.randn(1536, 384, generator=torch.Generator().manual_seed(0))
    found = godec_support(weight, 16, 64)
    assert found.numel() == 64 and found.unique().numel() == 64


# -- training, merge, load_model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT trained 4 steps with each init (r 4, alpha 8, N 50), the godec run merged."""
    root = tmp_path_factory.mktemp("dsee")
    base = tiny_classifier_dir("bert")
    for init in INITS:
        mposurgeon.train(
            base, output=root / init, method="dsee", lora_r=4, lora_alpha=8, sparse_size=50,
            sparse_init=init, data=TRAIN, eval_data=EVAL, max_steps=4, batch_size=16, lr=1e-2,
        )  # fmt: skip
    mposurgeon.merge(root / "godec", output=root / "merged", verify=True)
    return {"root": root, "base": base}


def _dense(tensors: dict[str, torch.Tensor], name: str, scaling: float, kind: str) -> torch.Tensor:
    """W + scaling B A (oriented as stored) + S, in float64, from the artifact's tensors."""
    a = tensors[f"{name}.lora_A.weight"].double()
    b = tensors[f"{name}.lora_B.weight"].double()
    weight = tensors[f"{name}.weight"].double()
    update = as_weight(scaling * (b @ a), kind)  # type: ignore[arg-type]
    sparse = torch.zeros(weight.numel(), dtype=torch.float64)
    sparse[tensors[f"{name}.dsee.index"]] = tensors[f"{name}.dsee.values"].double()
    return weight + update + sparse.view_as(weight)


@pytest.mark.parametrize("init", INITS)
def test_the_trained_sparse_update_lies_inside_its_support(
    runs: dict[str, Path], init: str
) -> None:
    """The artifact holds the base weight unchanged, the factors and the N values at Ω; every
    entry where the trained weight differs from W + (alpha / r) B A is a position of Ω."""
    out = runs["root"] / init
    manifest = read_manifest(out)
    tensors = load_file(out / "model.safetensors")
    base = load_file(runs["base"] / "model.safetensors")
    assert len(manifest.modules) == 4
    assert not any(
        ".base_layer." in k or ".default." in k or "parametrizations" in k for k in tensors
    )
    moved = 0
    for name, rec in manifest.modules.items():
        assert isinstance(rec, DseeRecord) and (rec.r, rec.alpha, rec.sparse_size) == (4, 8, 50)
        assert rec.sparse_init == init and rec.params == 4 * (32 + 32) + 50
        for key, shape in rec.tensor_shapes().items():
            assert tuple(tensors[key].shape) == shape
        assert torch.equal(tensors[rec.weight_key], base[rec.weight_key.removeprefix("bert.")])
        index = tensors[f"{name}.dsee.index"]
        assert index.numel() == 50 and index.unique().numel() == 50
        low_rank = tensors[rec.weight_key].double() + 2.0 * (
            tensors[f"{name}.lora_B.weight"].double() @ tensors[f"{name}.lora_A.weight"].double()
        )
        off = (_dense(tensors, name, 2.0, rec.kind) - low_rank).reshape(-1) != 0
        inside = torch.zeros_like(off)
        inside[index] = True
        assert not bool((off & ~inside).any()), name
        moved += int(off.sum())
    assert moved > 0  # the values trained off zero


def test_merge_folds_w_plus_scaled_ba_plus_s(runs: dict[str, Path]) -> None:
    root = runs["root"]
    tensors = load_file(root / "godec" / "model.safetensors")
    merged = load_file(root / "merged" / "model.safetensors")
    records = read_manifest(root / "godec").modules
    assert not any("lora" in k or "dsee" in k for k in merged)
    for name, rec in records.items():
        expected = _dense(tensors, name, 8 / 4, rec.kind)
        torch.testing.assert_close(merged[rec.weight_key].double(), expected, rtol=0, atol=1e-6)


def test_load_model_scores_as_trains_last_evaluation_and_as_the_merged_model(
    runs: dict[str, Path],
) -> None:
    root = runs["root"]
    metrics = read_manifest(root / "godec").metrics
    assert metrics is not None and metrics["method"] == "dsee"
    assert metrics["method_options"]["sparse_size"] == 50
    scores = mposurgeon.evaluate(root / "godec", data=EVAL).metrics
    assert scores["loss"] == pytest.approx(metrics["eval"][-1]["loss"], abs=1e-6)
    assert scores["accuracy"] == metrics["eval"][-1]["accuracy"]
    merged = mposurgeon.evaluate(root / "merged", data=EVAL).metrics
    assert merged["accuracy"] == scores["accuracy"]
    assert merged["loss"] == pytest.approx(scores["loss"], abs=1e-5)
    loaded = mposurgeon.load_model(root / "godec")
    torch.testing.assert_close(
        sample_logits(loaded, runs["base"]),
        sample_logits(mposurgeon.load_model(root / "merged"), runs["base"]),
        rtol=0,
        atol=1e-5,
    )


def test_gpt2_conv1d_layers_merge_transposed(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """GPT-2 stores Conv1D weights as (in, out): B A is transposed, the support indexes the
    stored weight."""
    out = tmp_path / "gpt2"
    mposurgeon.train(
        tiny_classifier_dir("gpt2"), output=out, method="dsee", lora_r=2, sparse_size=40,
        data=TRAIN, max_steps=3, batch_size=16, lr=1e-2,
    )  # fmt: skip
    records = read_manifest(out).modules
    assert records and all(r.kind == "conv1d" for r in records.values())
    merged = mposurgeon.merge(out, output=tmp_path / "merged", verify=True)
    assert merged.comparison is not None and merged.comparison.ok
    tensors = load_file(out / "model.safetensors")
    dense = load_file(tmp_path / "merged" / "model.safetensors")
    for name, rec in records.items():
        expected = _dense(tensors, name, 2.0, "conv1d")
        torch.testing.assert_close(dense[rec.weight_key].double(), expected, rtol=0, atol=1e-6)


# -- refusals --------------------------------------------------------------------------------------


def test_bad_dsee_options_are_one_line_errors_and_write_nothing(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    base, out = tiny_classifier_dir("bert"), tmp_path / "o"
    args = ("train", base, "--data", TRAIN, "--max-steps", "1", "-o", out, "--method", "dsee")
    for extra, needle in [
        (("--sparse-size", "0"), "invalid option --sparse-size"),
        (("--sparse-size", "1025"), "--sparse-size 1,025 is more than the 1,024 entries"),
        (("--budget", "5000"), "--budget is not an option of method dsee"),
        (("--sparse-init", "nope"), "invalid option --sparse-init"),
        (("--layers", "embeddings"), "the targets include an embedding"),
    ]:
        assert_one_line_error(run_cli(capsys, *args, *extra), 2, needle)
        assert not out.exists() and not list(tmp_path.iterdir())
    result = run_cli(capsys, "train", base, "--data", TRAIN, "-o", out, "--sparse-size", "8",
                     "--method", "lora")  # fmt: skip
    assert_one_line_error(result, 2, "--sparse-size is not an option of method lora")


@pytest.mark.parametrize("init", ["godec", "random"])
def test_an_interrupted_run_resumes_to_the_same_weights(
    init: str, tiny_classifier_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """The LoRA layers and the sparse parametrizations are rebuilt from the options (the
    support as the run chose it) before the checkpoint is read."""
    from mposurgeon.stages.train import TrainingInterrupted
    from tests.cli_runner import stop_at_step

    base = tiny_classifier_dir("bert")
    common = dict(
        method="dsee", lora_r=2, sparse_size=30, sparse_init=init, data=TRAIN, max_steps=6,
        batch_size=16, lr=1e-2, save_every=2,
    )  # fmt: skip
    mposurgeon.train(base, output=tmp_path / "straight", **common)
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(base, output=tmp_path / "resumed", progress=stop_at_step(5), **common)
    resumed = mposurgeon.train(base, output=tmp_path / "resumed", resume=True, **common)
    assert resumed.resumed_from_step == 4
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".dsee.index") for k in a)
