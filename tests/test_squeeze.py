"""Dimension squeezing during training: the final allocation and ratio, a cut equal to
`truncate`, no optimizer state of old shapes, resume between cuts, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import mpo_cores
from mposurgeon.mpo.allocation import BondProblem
from mposurgeon.mpo.decomposition import bond_spectra
from mposurgeon.stages.train import TrainingInterrupted
from mposurgeon.training import loop as loop_module
from mposurgeon.training.squeeze import Distillation, SqueezeSchedule, cut_bonds, plan_bonds
from tests.cli_runner import assert_one_line_error, run_cli, stop_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parent.parent / "data"
TRAIN = DATA / "sentiment-train.jsonl"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def mpo_bert(tiny_classifier_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("squeeze") / "mpo"
    mposurgeon.decompose(tiny_classifier_dir("bert"), output=out, layers="FFN_1,FFN_2,attention")
    return out


def test_schedule_spreads_the_cuts_and_the_targets() -> None:
    schedule = SqueezeSchedule(total_steps=40, cuts=3, ratio=0.3)
    assert schedule.steps() == [10, 20, 30]
    start, final = (1, 64, 16, 9, 1), (1, 8, 16, 10, 1)  # a bond the plan does not lower stays
    assert [schedule.bonds(i, start, final) for i in (1, 2, 3)] == [
        (1, 32, 16, 9, 1),
        (1, 16, 16, 9, 1),
        (1, 8, 16, 9, 1),
    ]
    assert SqueezeSchedule(40, 3, ratio=0.3, until=0.5).steps() == [7, 13, 20]
    for until in (0.0, 1.0):
        with pytest.raises(ValueError, match="until must lie in"):
            SqueezeSchedule(40, 3, ratio=0.3, until=until)
    with pytest.raises(ValueError, match="need more than 4 steps"):
        SqueezeSchedule(4, 3, ratio=0.3, until=0.5)  # cuts at steps 1, 1, 2: not separate


@pytest.mark.parametrize("method", ["lightweight", "overparam"])
def test_squeeze_reaches_the_ratio_and_the_artifact_holds_the_cut_cores(
    mpo_bert: Path, tmp_path: Path, method: str
) -> None:
    """The final MPO parameter ratio is at most R and within one bond drop of it; records,
    files and `load_model` agree on the bonds; eval of the artifact equals the run's own."""
    out = tmp_path / "squeezed"
    result = mposurgeon.train(
        mpo_bert, output=out, method=method, data=TRAIN, eval_data=TRAIN, max_steps=8,
        batch_size=8, lr=1e-3, squeeze_to=0.4, squeeze_steps=2, squeeze_until=2 / 3,
    )  # fmt: skip
    squeeze = result.metrics["squeeze"]
    assert squeeze["steps"] == [3, 5] and len(squeeze["log"]) == 2
    start, final = squeeze["start_params"], squeeze["final_params"]
    records = [r for r in read_manifest(out).modules.values() if isinstance(r, MPORecord)]
    largest_drop = max(
        max(r.bonds[b - 1] * s0 + s1 * r.bonds[b + 1] for b, (s0, s1) in _pairs(r)) for r in records
    )
    assert 0.4 * start - largest_drop <= final <= 0.4 * start
    planned = squeeze["final_bonds"]  # the allocation made at the first cut, reached at the last
    assert {name.removeprefix("bert.") for name in planned} == {
        name.removeprefix("bert.") for name in read_manifest(out).modules
    }
    bonds = {name.removeprefix("bert."): r.bonds for name, r in read_manifest(out).modules.items()}
    assert all(list(b) == list(bonds[name.removeprefix("bert.")]) for name, b in planned.items())
    files = _tensors(out)
    assert sum(r.params for r in records) == final
    for rec in records:
        for key, shape in rec.tensor_shapes().items():
            assert tuple(files[key].shape) == shape, key
    model = mposurgeon.load_model(out)
    assert sum(p.numel() for c in mpo_cores(model).values() for p in c.core) == final
    loss = mposurgeon.evaluate(out, data=TRAIN).metrics["loss"]
    assert loss == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    first, second = squeeze["log"]
    assert first["params_after"] < first["params_before"] == start
    assert second["params_after"] == final and first["eval_before"]["rows"] == 320


def _pairs(rec: MPORecord) -> list[tuple[int, tuple[int, int]]]:
    sites = [i * j for i, j in zip(rec.out_modes, rec.in_modes, strict=True)]
    return [(b, (sites[b - 1], sites[b])) for b in range(1, len(sites))]


def test_a_cut_without_training_equals_truncate(mpo_bert: Path, tmp_path: Path) -> None:
    model = mposurgeon.load_model(mpo_bert)
    start = sum(p.numel() for c in mpo_cores(model).values() for p in c.core)
    schedule = SqueezeSchedule(total_steps=4, cuts=1, ratio=0.5, until=0.5)
    cut_bonds(model, schedule, 1, plan_bonds(model, schedule, start))
    mposurgeon.truncate(mpo_bert, output=tmp_path / "t", param_ratio=0.5)
    truncated = _tensors(tmp_path / "t")
    for name, cores in mpo_cores(model).items():
        file_name = name.removeprefix("bert.") if name.startswith("bert.") else name
        for k, core in enumerate(cores.core):
            expected = truncated.get(f"{file_name}.mpo.core.{k}")
            if expected is None:
                expected = truncated[f"bert.{file_name}.mpo.core.{k}"]
            assert core.shape == expected.shape and torch.allclose(core, expected, atol=1e-6)


def test_the_optimizer_holds_no_state_of_the_old_shapes(
    mpo_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[int] = []
    original = loop_module.TrainingRun._after_step

    def after_step(self: Any, loss: float) -> None:
        original(self, loss)
        params = {p for g in self.optimizer.param_groups for p in g["params"]}
        for p, state in self.optimizer.optimizer.state.items():
            assert p in params
            assert all(t.shape == p.shape for t in state.values() if t.dim() > 0)
        live = {p for c in mpo_cores(self.unwrapped).values() for p in c.core if p.requires_grad}
        assert live <= params  # every trainable core is optimized, none of the old ones
        checked.append(self.state.step)

    monkeypatch.setattr(loop_module.TrainingRun, "_after_step", after_step)
    mposurgeon.train(
        mpo_bert, output=tmp_path / "o", method="overparam", data=TRAIN, max_steps=6,
        batch_size=8, lr=1e-3, squeeze_to=0.5, squeeze_steps=2, squeeze_until=2 / 3,
    )  # fmt: skip
    assert checked == [1, 2, 3, 4, 5, 6]


def test_resume_between_two_cuts_gives_the_straight_run(mpo_bert: Path, tmp_path: Path) -> None:
    """Cuts at steps 3 and 6 of 9; killed after step 5 (checkpoint at 4: one cut done),
    resumed: the same cores, bonds and squeeze log as a run straight through."""
    common: dict[str, Any] = dict(
        data=TRAIN, method="lightweight", max_steps=9, batch_size=8, lr=1e-3, seed=1,
        save_every=2, squeeze_to=0.4, squeeze_steps=2, squeeze_until=2 / 3,
    )  # fmt: skip
    straight = mposurgeon.train(mpo_bert, output=tmp_path / "straight", **common)
    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(mpo_bert, output=out, progress=stop_at_step(5), **common)
    resumed = mposurgeon.train(mpo_bert, output=out, resume=True, **common)
    assert resumed.resumed_from_step == 4
    a, b = _tensors(straight.output), _tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics["squeeze"]["log"] == straight.metrics["squeeze"]["log"]


def test_rel_tol_squeeze_keeps_every_bound(mpo_bert: Path, tmp_path: Path) -> None:
    result = mposurgeon.train(
        mpo_bert, output=tmp_path / "o", method="lightweight", data=TRAIN, max_steps=4,
        batch_size=8, lr=1e-3, squeeze_rel_tol=0.3, squeeze_steps=1, squeeze_until=0.5,
    )  # fmt: skip
    (cut,) = result.metrics["squeeze"]["log"]
    assert 0 < cut["max_predicted_error"] <= 0.3 and cut["params_after"] < cut["params_before"]
    model = mposurgeon.load_model(tmp_path / "o")
    for cores in mpo_cores(model).values():
        tensors = [c.detach() for c in cores.core]
        problem = BondProblem.from_cores(tensors, bond_spectra(tensors))
        assert problem.error(problem.bonds) < 1e-5  # the stored cores are what was cut


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["--method", "lora", "--squeeze-to", "0.5"], 2, ["--squeeze-to", "--method lora"]),
        (["--squeeze-to", "0.5", "--squeeze-rel-tol", "0.2"], 2, ["not both"]),
        (["--squeeze-steps", "2"], 2, ["--squeeze-steps needs"]),
        (["--distill-alpha", "0.5"], 2, ["--distill-alpha", "needs"]),
        (
            ["--squeeze-to", "0.5", "--select-best", "accuracy", "--eval-data", TRAIN],
            2,
            ["--select-best"],
        ),
        (["--squeeze-to", "0.0001"], 2, ["out of reach"]),
        (["--squeeze-until", "0.5"], 2, ["--squeeze-until needs"]),
        (["--squeeze-to", "0.5", "--squeeze-until", "1.5"], 2, ["--squeeze-until", "less than 1"]),
        (
            ["--squeeze-to", "0.5", "--squeeze-steps", "30"],
            2,
            ["--squeeze-steps 30 by", "need separate optimizer steps"],
        ),
    ],
)
def test_bad_squeezes_are_one_line_and_write_nothing(
    mpo_bert: Path, tmp_path: Path, capsys, args: list[str], code: int, needles: list[str]
) -> None:
    out = tmp_path / "o"
    base = ["train", mpo_bert, "--data", TRAIN, "--max-steps", "4", "-o", out]
    if "--method" not in args:
        base += ["--method", "lightweight"]
    assert_one_line_error(run_cli(capsys, *base, *args), code, *needles)
    assert not out.exists()


def test_squeeze_of_a_dense_input_says_decompose_first(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    src = tiny_classifier_dir("bert")
    result = run_cli(
        capsys, "train", src, "--method", "full", "--data", TRAIN, "--squeeze-to", "0.5",
        "-o", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(result, 2, "no MPO modules to squeeze", "decompose")


def test_distillation_loss_is_the_softened_kl() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    task = torch.tensor(0.7)
    d = Distillation(alpha=0.25, temperature=3.0)
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student / 3, -1), torch.log_softmax(teacher / 3, -1),
        reduction="batchmean", log_target=True,
    )  # fmt: skip
    expected = 0.75 * task + 0.25 * 9 * kl
    assert d.loss(task, student, teacher, None).item() == pytest.approx(expected.item(), 1e-5)
    assert d.loss(task, teacher, teacher, None).item() == pytest.approx(0.75 * 0.7, 1e-6)
    tokens, labels = torch.randn(2, 4, 5), torch.tensor([[1, 2, -100, -100], [3, -100, 1, 2]])
    kept = d.loss(task, tokens, torch.zeros(2, 4, 5), labels)  # positions with a label only
    masked = tokens[labels != -100]
    alone = d.loss(task, masked, torch.zeros_like(masked), None)
    assert kept.item() == pytest.approx(alone.item(), 1e-6)


def test_distilled_squeeze_resumes_with_its_teacher(mpo_bert: Path, tmp_path: Path) -> None:
    """The teacher (the model before the first cut) is kept in the checkpoint: a run killed
    after the first cut resumes to the straight run's weights."""
    common: dict[str, Any] = dict(
        data=TRAIN, method="lightweight", max_steps=9, batch_size=8, lr=1e-3, seed=1,
        save_every=2, squeeze_to=0.4, squeeze_steps=2, squeeze_until=2 / 3, distill_alpha=0.5,
    )  # fmt: skip
    straight = mposurgeon.train(mpo_bert, output=tmp_path / "straight", **common)
    plain = dict(common, distill_alpha=None)
    undistilled = mposurgeon.train(mpo_bert, output=tmp_path / "plain", **plain)
    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        mposurgeon.train(mpo_bert, output=out, progress=stop_at_step(5), **common)
    mposurgeon.train(mpo_bert, output=out, resume=True, **common)
    a, b, c = _tensors(straight.output), _tensors(out), _tensors(undistilled.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the teacher did pull


def test_inspect_reports_the_multiply_adds_of_the_cut_cores(mpo_bert: Path, tmp_path: Path) -> None:
    from mposurgeon.mpo.contract import contract_flops, reconstruct_flops

    out = tmp_path / "cut"
    mposurgeon.truncate(mpo_bert, output=out, param_ratio=0.3)
    macs = mposurgeon.inspect(out)["params"]["multiply_adds"]
    cores = [list(c.core) for c in mpo_cores(mposurgeon.load_model(out)).values()]
    assert macs["contract_per_row"] == sum(contract_flops(c, 1) for c in cores)
    assert macs["reconstruct"] == sum(reconstruct_flops(c) for c in cores)
    records = [r for r in read_manifest(out).modules.values() if isinstance(r, MPORecord)]
    assert macs["dense_per_row"] == sum(r.out_dim * r.in_dim for r in records)


def test_the_cli_reports_each_cut_and_the_ratio_reached(
    mpo_bert: Path, tmp_path: Path, capsys
) -> None:
    result = run_cli(
        capsys, "train", mpo_bert, "--method", "lightweight", "--data", TRAIN, "--eval-data",
        TRAIN, "--max-steps", "6", "--batch-size", "8", "--squeeze-to", "0.5", "--squeeze-steps",
        "2", "--squeeze-until", "0.5", "-o", tmp_path / "o",
    )  # fmt: skip
    assert result.code == 0, result.err
    squeeze = read_manifest(tmp_path / "o").metrics["squeeze"]
    start, (first, second) = squeeze["start_params"], squeeze["log"]
    lines = [line for line in result.out.splitlines() if line.startswith("squeeze")]
    assert lines[0].startswith(
        f"squeeze cut 1 of 2 at step 2: MPO parameters {first['params_before']:,} -> "
        f"{first['params_after']:,} (ratio {first['params_after'] / start:.3f})"
    )
    assert lines[1].startswith(
        f"squeeze cut 2 of 2 at step 3: MPO parameters {second['params_before']:,}"
    )
    assert "eval accuracy" in lines[0]
    assert lines[2] == (
        f"squeezed: MPO parameters {start:,} -> {squeeze['final_params']:,} "
        f"(ratio {squeeze['ratio']:.3f})"
    )
