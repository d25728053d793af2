"""MPOE: `moe` upcycling (exact outputs, parameter formula, one shared central core), the
router (balance loss, capacity, reproducibility), `train --method mpoe` (gradient mask, load
metrics, save and load), inspect, and bad input."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods.mpoe.record import MPOERecord
from mposurgeon.models.moe import MoELinear, Router
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import ARCHITECTURES

DATA = Path(__file__).resolve().parent.parent / "data"
TRAIN = DATA / "sentiment-train.jsonl"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids} if arch in ("t5", "bart") else {}
    return {"input_ids": ids, **extra}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_upcycled_model_computes_what_the_dense_one_did(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, arch: str
) -> None:
    src = tiny_model_dir(arch)
    result = mposurgeon.moe(src, output=tmp_path / "moe", experts=4, top_k=2 if arch != "t5" else 1)
    model = mposurgeon.load_model(tmp_path / "moe")
    assert sum(isinstance(m, MoELinear) for m in model.modules()) == sum(
        len(b.targets) for b in result.blocks
    )
    dense = type(model).from_pretrained(src).eval()
    with torch.no_grad():
        expected, got = dense(**_inputs(arch))[0], model(**_inputs(arch))[0]
    assert (got - expected).abs().max().item() < 1e-5
    assert result.gate == ("switch" if arch == "t5" else "normalized")


def test_parameters_follow_the_formula_and_the_central_core_is_shared(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Total = the dense part + per matrix one central core + E sets of auxiliary cores +
    one router per block; the central core is one tensor in the file and in memory."""
    src, out, experts = tiny_model_dir("llama"), tmp_path / "moe", 3
    dense = _tensors(src)
    result = mposurgeon.moe(src, output=out, experts=experts, num_cores=3)
    records = [r for r in read_manifest(out).modules.values() if isinstance(r, MPOERecord)]
    assert len(records) == 3 * 2  # gate, up, down in each of 2 layers
    targets = {r.weight_key for r in records}
    formula = sum(t.numel() for k, t in dense.items() if k not in targets)
    for rec in records:
        sizes = [math.prod(s) for s in rec.core_shapes()]
        central = sizes[rec.central_index]
        formula += central + experts * (sum(sizes) - central)
        if rec.owns_router:
            formula += experts * rec.router_in
    files = _tensors(out)
    assert sum(t.numel() for t in files.values()) == formula
    assert formula == (sum(t.numel() for k, t in dense.items() if k not in targets) + result.mpoe)
    assert sum(k.endswith(".mpoe.central") for k in files) == len(records)  # once each
    model = mposurgeon.load_model(out)
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, MoELinear)
    cores = [layer.mpoe.cores(e)[layer.mpoe.shape.central_index] for e in range(experts)]
    assert all(c is layer.mpoe.central for c in cores)  # one Parameter, not E copies
    assert sum(p.numel() for p in model.parameters()) == formula  # lm_head tied: not counted
    assert result.dense_experts == experts * result.dense + result.routers


def test_balance_loss_is_one_for_uniform_routing_and_e_for_one_expert() -> None:
    experts = 4
    router = Router(torch.eye(experts) * 5.0, top_k=1).train()
    uniform = torch.eye(experts).repeat(3, 1)  # 3 tokens for each expert, symmetric probs
    router.route(uniform)
    assert router.balance_losses[-1].item() == pytest.approx(1.0)
    assert router.load.tolist() == [3.0] * experts
    router.route(torch.eye(experts)[:1].repeat(8, 1) * 100)  # every token to expert 0, p = 1
    assert router.balance_losses[-1].item() == pytest.approx(experts, rel=1e-4)


def test_capacity_drops_overflow_in_training_only() -> None:
    router = Router(torch.eye(2) * 5.0, top_k=1, capacity_factor=1.0)
    tokens = torch.eye(2)[[0, 0, 0, 1]]  # 3 tokens want expert 0, capacity ceil(4/2) = 2
    router.train()
    routing = router.route(tokens)
    assert routing.experts.view(-1).tolist() == [0, 0, -1, 1]
    assert routing.gates.view(-1)[2].item() == 0.0
    router.eval()
    assert router.route(tokens.clone()).experts.view(-1).tolist() == [0, 0, 0, 1]


def test_normalized_gates_sum_to_one_and_still_train_the_router() -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    router = Router(weight, top_k=1, capacity_factor=0)  # no capacity: no slot dropped
    x = torch.randn(5, 6)
    routing = router.route(x)
    assert torch.allclose(routing.gates, torch.ones_like(routing.gates))
    (routing.gates * torch.arange(5.0).unsqueeze(-1)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_router_is_reproducible_with_seed(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    src = tiny_model_dir("bert")
    routers = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        mposurgeon.moe(src, output=tmp_path / name, experts=4, seed=seed)
        routers.append({k: v for k, v in _tensors(tmp_path / name).items() if "router" in k})
    assert routers[0].keys() == routers[1].keys() and len(routers[0]) == 2
    assert all(torch.equal(routers[0][k], routers[1][k]) for k in routers[0])
    assert not all(torch.equal(routers[0][k], routers[2][k]) for k in routers[0])


@pytest.fixture(scope="module")
def bert_moe(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "bert-moe"
    mposurgeon.moe(tiny_classifier_dir("bert"), output=out, experts=4, top_k=2)
    return out


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_gradient_mask_freezes_or_updates_the_central_core(
    bert_moe: Path, tmp_path: Path, p: float
) -> None:
    out = tmp_path / "trained"
    result = mposurgeon.train(
        bert_moe, output=out, method="mpoe", data=TRAIN, eval_data=TRAIN, max_steps=3,
        batch_size=8, lr=1e-2, grad_mask_p=p,
    )  # fmt: skip
    before, after = _tensors(bert_moe), _tensors(out)
    central = [k for k in before if k.endswith(".mpoe.central")]
    trained = {k.removeprefix("bert."): v for k, v in after.items()}
    same = [torch.equal(before[k], trained[k.removeprefix("bert.")]) for k in central]
    assert all(same) if p == 1.0 else not any(same)
    auxiliary = [k for k in before if ".mpoe.experts." in k]
    assert not all(torch.equal(before[k], trained[k.removeprefix("bert.")]) for k in auxiliary)
    load = result.metrics["expert_load"]
    assert len(load) == 2 and all(sum(v) == pytest.approx(1.0, abs=1e-3) for v in load.values())
    loss = mposurgeon.evaluate(out, data=TRAIN).metrics["loss"]  # load_model runs it
    assert loss == pytest.approx(result.metrics["eval_loss"], rel=1e-5)


def test_gradient_mask_drops_with_its_probability_every_step() -> None:
    """p = 0 keeps the gradient at every step; p = 0.5 drops it at some steps, the same ones
    for the same seed."""
    from mposurgeon.methods.mpoe.config import MPOEConfig
    from mposurgeon.methods.mpoe.method import MPOEMethod
    from mposurgeon.models.moe import MPOExperts
    from mposurgeon.mpo.shapes import MPOShape

    shape = MPOShape(4, 4, (2, 2), (2, 2))
    cores = [torch.randn(1, 2, 2, 4), torch.randn(4, 2, 2, 1)]
    layer = MoELinear(
        MPOExperts(shape, cores[0], [[cores[1]]] * 2), Router(torch.zeros(2, 4)), "in"
    )
    model = torch.nn.Sequential(layer)

    def kept(p: float, seed: int) -> list[bool]:
        out = []
        for step in range(40):
            layer.mpoe.central.grad = torch.ones_like(layer.mpoe.central)
            MPOEMethod(MPOEConfig(grad_mask_p=p)).before_optimizer_step(model, step, seed)
            out.append(layer.mpoe.central.grad is not None)
        return out

    assert all(kept(0.0, 0)) and not any(kept(1.0, 0))
    half = kept(0.5, 0)
    assert 5 < sum(half) < 35 and half == kept(0.5, 0) and half != kept(0.5, 1)


def test_inspect_shows_experts_parameters_and_load(
    bert_moe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trained"
    mposurgeon.train(bert_moe, output=out, method="mpoe", data=TRAIN, max_steps=2, batch_size=8)
    report = mposurgeon.inspect(out)["experts"]
    assert report["experts"] == 4 and report["blocks"] == 2 and report["top_k"] == 2
    p = report["params"]
    assert p["mpoe"] == p["shared"] + 4 * p["per_expert"] + p["routers"]
    assert set(report["load"]) == {"bert.encoder.layer.0", "bert.encoder.layer.1"}
    result = run_cli(capsys, "inspect", out)
    assert result.code == 0
    assert "experts: 4 per matrix in 2 FFN blocks" in result.out
    assert "load bert.encoder.layer.0:" in result.out


def test_cli_dry_run_writes_nothing(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    result = run_cli(
        capsys, "moe", tiny_model_dir("gpt2"), "--experts", "8", "--dry-run", "-o", out
    )
    assert result.code == 0, result
    assert "would upcycle 4 matrices in 2 FFN blocks to 8 experts" in result.out
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--experts", "2", "--top-k", "3"], ["--top-k 3", "2 experts"]),
        (["--gate", "switch", "--top-k", "2"], ["switch gates"]),
        (["--layers", "attention"], ["not a feed-forward matrix"]),
        (["--layers", "FFN_1"], ["FFN_2 (down) projection is not targeted"]),
        (["--experts", "1"], ["experts"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tiny_model_dir, tmp_path: Path, capsys, args: list[str], needles: list[str]
) -> None:
    out = tmp_path / "out"
    result = run_cli(capsys, "moe", tiny_model_dir("bert"), *args, "-o", out)
    assert_one_line_error(result, 2, *needles)
    assert not out.exists()


def test_missing_path_existing_output_and_wrong_method(
    tiny_model_dir, bert_moe: Path, tmp_path: Path, capsys
) -> None:
    missing = run_cli(capsys, "moe", tmp_path / "nothing", "-o", tmp_path / "o")
    assert_one_line_error(missing, 4, "no such file or directory")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = run_cli(capsys, "moe", tiny_model_dir("bert"), "-o", existing)
    assert result.code != 0 and (existing / "keep.txt").read_text() == "mine"
    again = run_cli(capsys, "moe", bert_moe, "-o", tmp_path / "twice")
    assert_one_line_error(again, 2, "held by the mpoe method")
    plain = run_cli(
        capsys, "train", tiny_model_dir("bert"), "--method", "mpoe", "--data", TRAIN,
        "-o", tmp_path / "t",
    )  # fmt: skip
    assert_one_line_error(plain, 2, "no mixture of experts", "mposurgeon moe")


def test_target_modules_alone_find_the_roles(tiny_model_dir) -> None:
    """A regex gives matrices without a group: their FFN role is still found."""
    regex = r".*layer\.0\.(intermediate|output)\.dense"
    result = mposurgeon.moe(tiny_model_dir("bert"), target_modules=regex, dry_run=True)
    (block,) = result.blocks
    assert block.roles == ["in", "out"] and block.router.endswith("layer.0.mpoe_router")


def test_an_mpo_input_gives_its_own_cores_to_the_experts(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Upcycling a truncated decomposition: every expert starts as the truncated matrix, the
    bonds are the input's, and the untargeted MPO modules pass through."""
    src = tiny_model_dir("bert")
    mpo = tmp_path / "mpo"
    mposurgeon.decompose(src, output=mpo, layers="FFN_1,FFN_2,attention", max_bond=6)
    result = mposurgeon.moe(mpo, output=tmp_path / "moe", experts=3)
    planned = mposurgeon.moe(mpo, experts=3, dry_run=True)
    before, after = read_manifest(mpo).modules, read_manifest(tmp_path / "moe").modules
    experts = {n: r for n, r in after.items() if isinstance(r, MPOERecord)}
    assert len(experts) == 4 and all(r.bonds == before[n].bonds for n, r in experts.items())
    mpoe_params = sum(r.params for r in experts.values())
    assert result.mpoe == planned.mpoe == mpoe_params  # the dry run counts the input's bonds
    assert {n for n in after if n not in experts} == {n for n in before if n not in experts}
    truncated, upcycled = mposurgeon.load_model(mpo), mposurgeon.load_model(tmp_path / "moe")
    with torch.no_grad():
        expected, got = truncated(**_inputs("bert"))[0], upcycled(**_inputs("bert"))[0]
    assert (got - expected).abs().max().item() < 1e-5
