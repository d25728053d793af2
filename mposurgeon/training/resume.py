"""Interrupted training runs and `--resume`: the `<out>.partial` directory beside an output.

With checkpoints on, a run keeps `<out>.partial/run.json` (the input and the options that shape
training) and `<out>.partial/checkpoint` (the loop's latest checkpoint). A resumed run must
name the same input and the same options (except `RESUME_FREE` ones); without `-o` the newest
`v<N>-train.partial` of this input in the workdir is found. A damaged record or checkpoint is a
`DamagedCheckpoint` whose hint says how to start over.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mposurgeon.errors import UsageError
from mposurgeon.training.loop import CHECKPOINT, DamagedCheckpoint, reading_checkpoint

#: Options that may differ between an interrupted run and its `--resume`.
RESUME_FREE = frozenset(
    {
        "resume",
        "overwrite",
        "output",
        "workdir",
        "verify_checksums",
        "offline",
        "cache_dir",
        "max_shard_size",
        "save_every",
        "eval_every",
    }
)

_START_OVER = "start over: run the same command with --overwrite instead of --resume, or delete {}"


def partial_of(out: Path) -> Path:
    """The `.partial` sibling of output directory `out`."""
    return out.parent / f"{out.name}.partial"


def run_record(input_path: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a run for `--resume`: the input and the options that shape training
    (`options` as the manifest records them)."""
    kept = {k: v for k, v in options.items() if k not in RESUME_FREE}
    return {"input": str(Path(input_path).resolve()), "options": kept}


def start_partial(partial: Path, record: dict[str, Any]) -> None:
    """A fresh `partial` directory holding `run.json`."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_run_record(partial: Path) -> dict[str, Any]:
    """`<partial>/run.json` (see `run_record`); a `DamagedCheckpoint` when it is missing or
    not such a record."""
    file = partial / "run.json"
    with start_over_hint(partial), reading_checkpoint(file):
        saved = json.loads(file.read_text(encoding="utf-8"))
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("input"), str)
        and isinstance(saved.get("options"), dict)
    ):
        raise DamagedCheckpoint(
            file, 'is not a run record {"input": ..., "options": ...}', _START_OVER.format(partial)
        )
    return saved


def check_resumable(partial: Path, expected: dict[str, Any]) -> None:
    """Refuse to resume `partial` without a checkpoint, or as a run of another input or with
    other options than `expected` (a `run_record`)."""
    if not (partial / CHECKPOINT).is_dir():
        raise UsageError(
            f"nothing to resume: no checkpoint in {partial}",
            hint="run without --resume, with --overwrite if the directory exists (checkpoints "
            "are written with --save-every N)",
        )
    saved = read_run_record(partial)
    if saved["input"] != expected["input"]:
        raise UsageError(
            f"{partial} is a run on {saved['input']}, not on {expected['input']}",
            hint="resume with the input of the interrupted run",
        )
    changed = sorted(
        k
        for k in set(saved["options"]) | set(expected["options"])
        if saved["options"].get(k) != expected["options"].get(k)
    )
    if changed:
        raise UsageError(
            f"options differ from the interrupted run in {partial}: {', '.join(changed)}",
            hint="resume with the same training options (--save-every, --eval-every, output "
            "and cache options may change)",
        )


def latest_partial_output(parent: Path, input_path: Path) -> Path:
    """The output `v<N>-train` in `parent` (the workdir's folder of the model) of the newest
    interrupted run of `input_path` whose `.partial` directory holds a run record."""
    pattern = re.compile(r"^v(\d+)-train\.partial$")
    wanted = str(Path(input_path).resolve())
    found = []
    for child in parent.iterdir() if parent.is_dir() else []:
        match = pattern.match(child.name)
        is_run = match is not None and (child / "run.json").is_file()
        if is_run and read_run_record(child)["input"] == wanted:
            found.append((int(match.group(1)), child))
    if not found:
        raise UsageError(
            f"nothing to resume: no interrupted train run of {input_path} in {parent}",
            hint="pass -o with the output of the interrupted run",
        )
    partial = max(found)[1]
    return partial.parent / partial.name.removesuffix(".partial")


@contextmanager
def start_over_hint(partial: Path) -> Iterator[None]:
    """Give a `DamagedCheckpoint` raised in the body the hint of how to start over."""
    try:
        yield
    except DamagedCheckpoint as exc:
        exc.hint = _START_OVER.format(partial)
        raise
