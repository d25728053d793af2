"""`train` against careless or hostile input (issue 9): a checkpoint without tokenizer, a
tokenizer that knows none of the words, non-finite or out-of-range options, a run that
diverges, damaged `--resume` checkpoints. Each is one error line with its exit code, and
nothing is written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import mposurgeon
from mposurgeon.stages.train import TrainingInterrupted
from tests.cli_runner import assert_one_line_error, run_cli, stop_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "sentiment-train.jsonl"
#: A short full fine-tuning run of the tiny BERT classifier (about a second).
SHORT = ("--mode", "full", "--data", TRAIN, "--max-steps", "3", "--batch-size", "8")


# -- item 6: a checkpoint without (a fitting) tokenizer --------------------------------------


def test_a_checkpoint_without_tokenizer_files_is_refused_before_training(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers builds an empty WordPiece for a BERT directory without vocabulary: every
    word [UNK]. That must be an error, not a trained model."""
    base = tiny_model_dir("bert")
    out = tmp_path / "o"
    result = run_cli(capsys, "train", base, "-o", out, *SHORT, "--save-every", "1")
    assert_one_line_error(result, 2, f"{base} has no tokenizer files", "hint: copy the tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_artifact_without_tokenizer_files_is_refused(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "dec"
    mposurgeon.decompose(tiny_model_dir("gpt2"), output=source, layers=["FFN_1"])
    out = tmp_path / "o"
    result = run_cli(capsys, "train", source, "-o", out, *SHORT)
    assert_one_line_error(result, 2, "has no tokenizer files", "decompose")
    assert not out.exists()


def test_a_tokenizer_that_knows_none_of_the_words_is_refused(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("bert"), base)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zyx", "wvu"]
    (base / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    result = run_cli(capsys, "train", base, "-o", out, *SHORT)
    assert_one_line_error(result, 2, "sentiment-train.jsonl", "unknown token")
    assert not out.exists()


# -- item 7: non-finite options, a diverging run ---------------------------------------------


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda config: [config], "is not a JSON object"),
        (lambda config: {**config, "model_type": "no-such-model"}, "model_type 'no-such-model'"),
        (lambda config: {**config, "num_hidden_layers": 1_000_000}, "num_hidden_layers=1000000"),
        (lambda config: {**config, "num_hidden_layers": 3}, "does not match the weights"),
    ],
    ids=["a list", "unknown model type", "a million layers", "3 layers over 2"],
)
def test_a_bad_config_is_one_line_before_anything_is_built(
    tiny_classifier_dir, tmp_path: Path, capsys, edit, needle: str
) -> None:
    """train reads config.json through the same checks as the other stages (it once built a
    meta model of a million layers, and reported a list as an internal error)."""
    source = tmp_path / "model"
    shutil.copytree(tiny_classifier_dir("bert"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(edit(config)))
    result = run_cli(capsys, "train", source, *SHORT, "-o", tmp_path / "out")
    assert_one_line_error(result, 1, "config.json", needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--mpo-lr", "inf"),
        ("--weight-decay", "inf"),
        ("--weight-decay", "nan"),
        ("--max-grad-norm", "inf"),
        ("--warmup-ratio", "nan"),
        ("--seed", str(2**70)),
        ("--seed", str(2**32)),
    ],
)
def test_non_finite_and_out_of_range_options_are_usage_errors(
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
) -> None:
    out = tmp_path / "o"
    result = run_cli(capsys, "train", tiny_classifier_dir("bert"), "-o", out, *SHORT, flag, value)
    assert_one_line_error(result, 2, flag)
    assert not out.exists()


def test_the_largest_seed_is_accepted(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    result = run_cli(
        capsys, "train", tiny_classifier_dir("bert"), "-o", out, *SHORT, "--seed", str(2**32 - 1),
        "--max-steps", "1",
    )  # fmt: skip
    assert result.code == 0, result
    assert out.is_dir()


@pytest.mark.parametrize("save_every", [None, "1"])
def test_a_diverging_run_stops_and_writes_nothing(
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    save_every: str | None,
) -> None:
    """--lr 1e10 blows the weights up: exit 3 naming the step, no artifact, no checkpoint
    (resuming one would diverge again: a resumed run takes exactly the same steps)."""
    out = tmp_path / "o"
    extra = ("--save-every", save_every) if save_every else ()
    result = run_cli(
        capsys, "train", tiny_classifier_dir("bert"), "-o", out, *SHORT, "--lr", "1e10",
        "--max-grad-norm", "1e30", *extra,
    )  # fmt: skip
    assert_one_line_error(result, 3, "training diverged", "step", "nothing was written", "--lr")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_resumed_run_that_diverges_keeps_the_checkpoint_it_resumed_from(
    tiny_classifier_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint existed before this command: it is not deleted, and the message says
    where it is; there is still no artifact."""
    base = tiny_classifier_dir("bert")
    out = tmp_path / "o"
    with pytest.raises(TrainingInterrupted) as info:
        mposurgeon.train(
            base, output=out, mode="full", data=TRAIN, max_steps=3, batch_size=8, save_every=1,
            lr=1e10, progress=stop_at_step(1),
        )  # fmt: skip
    partial = info.value.partial
    result = run_cli(
        capsys, "train", base, "-o", out, *SHORT, "--save-every", "1", "--lr", "1e10", "--resume"
    )
    assert_one_line_error(result, 3, "training diverged", f"kept in {partial}")
    assert not out.exists() and (partial / "checkpoint" / "state.json").is_file()


# -- item 16: damaged --resume checkpoints ---------------------------------------------------


RESUMED = ("--mode", "full", "--data", TRAIN, "--max-steps", "3", "--batch-size", "8",
           "--save-every", "1")  # fmt: skip


@pytest.fixture(scope="module")
def interrupted(
    tiny_classifier_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The `.partial` directory of a real run interrupted after step 2 (checkpoint of step 2)."""
    out = tmp_path_factory.mktemp("interrupted") / "o"
    with pytest.raises(TrainingInterrupted) as info:
        mposurgeon.train(
            tiny_classifier_dir("bert"),
            output=out,
            mode="full",
            data=TRAIN,
            max_steps=3,
            batch_size=8,
            save_every=1,
            progress=stop_at_step(2),
        )
    partial = info.value.partial
    assert (partial / "checkpoint" / "state.json").is_file()
    return partial


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"garbage, not a checkpoint\n")


def _json(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "run.json missing": ("run.json", Path.unlink),
    "run.json garbage": ("run.json", _json("{not json")),
    "run.json a list": ("run.json", _json("[1, 2]\n")),
    "run.json without options": ("run.json", _json('{"input": "x"}\n')),
    "state.json missing": ("checkpoint/state.json", Path.unlink),
    "state.json garbage": ("checkpoint/state.json", _json("{")),
    "state.json empty object": ("checkpoint/state.json", _json("{}\n")),
    "weights missing": ("checkpoint/model.safetensors", Path.unlink),
    "weights truncated": ("checkpoint/model.safetensors", _truncate),
    "optimizer missing": ("checkpoint/optimizer.pt", Path.unlink),
    "optimizer truncated": ("checkpoint/optimizer.pt", _truncate),
    "rng garbage": ("checkpoint/rng-0.pt", _garbage),
    "rng missing": ("checkpoint/rng-0.pt", Path.unlink),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_with_how_to_start_over(
    interrupted: Path,
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    out = tmp_path / "o"
    partial = tmp_path / "o.partial"
    shutil.copytree(interrupted, partial)
    name, damage = DAMAGE[kind]
    damage(partial / name)
    before = {p.relative_to(partial): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    result = run_cli(capsys, "train", tiny_classifier_dir("bert"), "-o", out, *RESUMED, "--resume")
    line = assert_one_line_error(result, 1, "damaged", str(partial), Path(name).name, "--overwrite")
    assert "hint:" in line
    assert not out.exists()  # no artifact, and the damaged checkpoint is left as it was
    after = {p.relative_to(partial): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    assert after == before


def test_a_damaged_checkpoint_in_the_workdir_is_named(
    interrupted: Path,
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without -o, resume looks for `v<N>-train.partial` in the workdir: a garbage run.json
    there is named, not a JSONDecodeError."""
    base = tiny_classifier_dir("bert")
    parent = tmp_path / "wd" / base.name
    parent.mkdir(parents=True)
    partial = parent / "v1-train.partial"
    shutil.copytree(interrupted, partial)
    (partial / "run.json").write_text("{oops", encoding="utf-8")
    result = run_cli(capsys, "train", base, "-w", tmp_path / "wd", *RESUMED, "--resume")
    assert_one_line_error(result, 1, "damaged", "run.json", str(partial))


def test_start_over_as_the_hint_says(
    interrupted: Path,
    tiny_classifier_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The hint's way out works: --overwrite without --resume trains from scratch."""
    out = tmp_path / "o"
    partial = tmp_path / "o.partial"
    shutil.copytree(interrupted, partial)
    (partial / "checkpoint" / "optimizer.pt").unlink()
    base = tiny_classifier_dir("bert")
    assert run_cli(capsys, "train", base, "-o", out, *RESUMED, "--resume").code == 1
    result = run_cli(capsys, "train", base, "-o", out, *RESUMED, "--overwrite")
    assert result.code == 0, result
    assert out.is_dir() and not partial.exists()
