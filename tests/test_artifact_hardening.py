"""Hardening of artifacts against hostile or damaged input and failing writes (issue 9).

Each test builds a real artifact with `decompose` (tiny BERT, 3 cores, FFN_1), damages it on
disk the way a careless or hostile user could, and checks that the tool refuses it with one
line naming the bad field, writes nothing, and never leaves its output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mposurgeon.artifact.manifest import MANIFEST_NAME, load_artifact, read_manifest
from mposurgeon.artifact.resolve import resolve_model
from mposurgeon.artifact.store import (
    atomic_directory,
    copy_model_files,
    next_version_dir,
    sha256_file,
)
from mposurgeon.artifact.tensors import open_tensors
from mposurgeon.errors import ArtifactError, ModelNotFoundError
from mposurgeon.stages.common import StageOptions, open_input, plan_output
from mposurgeon.stages.decompose import decompose
from tests.cli_runner import assert_one_line_error, run_cli

FFN = "encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def artifact(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):
    """A genuine decompose artifact of tiny BERT (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("hardening") / "art"
    decompose(tiny_model_dir("bert"), output=out, num_cores=3, layers=["FFN_1"])
    return out


def _copy(artifact: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of `artifact` whose manifest `edit` changed (the files' checksums stay valid)."""
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    data = json.loads((art / MANIFEST_NAME).read_text())
    edit(data)
    text = json.dumps(data).replace(f'"{_DEEP}"', '{"a": ' * 100_000 + "1" + "}" * 100_000)
    (art / MANIFEST_NAME).write_text(text)
    return art


_DEEP = "<nested 100000 levels deep>"  # too deep for json.dumps: spliced into the text


def _no_output(workdir: Path) -> None:
    leftovers = [p for p in workdir.rglob("*") if p.is_file()] if workdir.exists() else []
    assert leftovers == []


# -- 3: names read from a manifest never become paths ------------------------------------------


@pytest.mark.parametrize("name", ["ABSOLUTE", "../../..", "..", "a/../../b"])
def test_base_name_cannot_send_the_output_outside_the_workdir(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    victim = tmp_path / "victim"
    bad = str(victim) if name == "ABSOLUTE" else name

    def edit(data: dict[str, Any]) -> None:
        data["base"]["name"] = bad

    art = _copy(artifact, tmp_path, edit)
    workdir = tmp_path / "deep" / "er" / "wd"
    result = run_cli(capsys, "merge", art, "-w", workdir)
    assert_one_line_error(result, 1, "base.name")
    assert not victim.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # nothing written anywhere


def test_next_version_dir_makes_a_name_one_safe_component(tmp_path: Path) -> None:
    for name in ("a/../../b", "/abs/dir", "x\\..\\y", "nul\0name"):
        out = next_version_dir(tmp_path, name, "merge")
        assert out.parent.parent == tmp_path and out.name == "v1-merge"
        assert "/" not in out.parent.name and "\0" not in out.parent.name
    for name in ("", ".", "..", " .. "):
        with pytest.raises(ArtifactError, match="cannot name a directory"):
            next_version_dir(tmp_path, name, "merge")


# -- 4: symlinks and unlisted model files in an artifact ---------------------------------------


def test_symlinked_tokenizer_file_is_refused_even_when_checksummed(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")

    def edit(data: dict[str, Any]) -> None:
        data["files"]["vocab.txt"] = sha256_file(secret)  # looks genuine to the checksums

    art = _copy(artifact, tmp_path, edit)
    (art / "vocab.txt").symlink_to(secret)
    result = run_cli(capsys, "merge", art, "-o", tmp_path / "out")
    assert_one_line_error(result, 1, "vocab.txt", "symbolic link")
    assert not (tmp_path / "out").exists()


def test_unlisted_tokenizer_file_is_refused_and_never_copied(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = _copy(artifact, tmp_path, lambda data: None)
    (art / "tokenizer_config.json").write_text('{"planted": true}')
    result = run_cli(capsys, "merge", art, "-o", tmp_path / "out")
    assert_one_line_error(result, 1, "tokenizer_config.json", "not listed")
    assert not (tmp_path / "out").exists()
    # and the copy step itself never takes an unlisted file from an artifact
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_model_files(art, dst) == ["config.json"]
    assert not (dst / "tokenizer_config.json").exists()


def test_an_artifact_in_the_hub_cache_may_link_to_its_blobs(artifact: Path, tmp_path: Path) -> None:
    """Hub cache snapshots are symlinks into the repository's blobs: those stay accepted."""
    repo = tmp_path / "models--org--art"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in artifact.iterdir():
        blob = repo / "blobs" / sha256_file(path)
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(blob)
    assert load_artifact(snapshot).modules.keys() == read_manifest(artifact).modules.keys()


# -- 8, 9, 18: the manifest is validated whole when it is read ---------------------------------


def _rename_key(data: dict[str, Any]) -> None:
    data["modules"]["renamed.module"] = data["modules"].pop(FFN)


def _dotdot_name(data: dict[str, Any]) -> None:
    record = data["modules"].pop(FFN)
    record["name"] = "../../etc/x"
    record["weight_key"] = "../../etc/x.weight"
    data["modules"]["../../etc/x"] = record


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["modules"][FFN][field] = value

    return edit


def _extra_record(data: dict[str, Any]) -> None:
    record = dict(data["modules"][FFN])
    record.update(
        name="encoder.layer.0.output.dense", weight_key="encoder.layer.0.output.dense.weight"
    )
    data["modules"][record["name"]] = record


def _orphan_cores(data: dict[str, Any]) -> None:
    del data["modules"][FFN]  # its cores stay in the tensor files


def _nested(depth: int) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        value: Any = 1
        for _ in range(depth):
            value = {"a": value}
        data["metrics"] = value

    return edit


def _top(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data[field] = value

    return edit


MANIFEST_FAULTS = {
    "key differs from name": (_rename_key, "modules.renamed.module.name"),
    "name with ../": (_dotdot_name, "modules.../../etc/x.name"),
    "weight_key of another module": (_set("weight_key", "lm_head.weight"), ".weight_key"),
    "dtype int8": (_set("dtype", "int8"), f"modules.{FFN}.dtype"),
    "unknown dtype": (_set("dtype", "float128"), f"modules.{FFN}.dtype"),
    "kind conv1d of a linear shape": (_set("kind", "conv1d"), f"modules.{FFN}.shape"),
    "transposed shape": (_set("shape", [32, 64]), f"modules.{FFN}.shape"),
    "record without cores": (_extra_record, "modules.encoder.layer.0.output.dense"),
    "cores without record": (_orphan_cores, f"{FFN}.mpo.core.0"),
    "metrics nested deeply": (_nested(200), "metrics"),
    "metrics nested past recursion": (_top("metrics", _DEEP), "nested too deeply"),
    "metrics a list": (_top("metrics", [1, 2]), "metrics"),
    "metrics steps a string": (_top("metrics", {"steps": "many"}), "metrics.steps"),
    "train metrics incomplete": (_top("metrics", {"method": "full", "steps": 3}), "metrics.epochs"),
    "selection chosen a number": (_top("selection", {"chosen": 5}), "selection.chosen"),
    "selection scores not numbers": (
        _top("selection", {"scores": {FFN: "high"}, "chosen": [FFN]}),
        f"selection.scores.{FFN}",
    ),
    "selection chosen a path": (_top("selection", {"chosen": ["../x"]}), "selection.chosen.0"),
    "selection schedule garbage": (_top("selection", {"schedule": {"rounds": 3}}), "selection"),
}


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_damaged_manifest_is_one_line_naming_the_field(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    edit, field = MANIFEST_FAULTS[fault]
    art = _copy(artifact, tmp_path, edit)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    for command in (["inspect", art], ["merge", art, "-w", tmp_path / "wd"]):
        assert_one_line_error(run_cli(capsys, *command), 1, field)
    result = run_cli(capsys, "truncate", art, "--param-ratio", "0.9", "-w", tmp_path / "wd")
    assert_one_line_error(result, 1, field)
    _no_output(tmp_path / "wd")
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before  # input untouched


def test_genuine_selection_and_metrics_still_load(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from mposurgeon.stages.select import select

    bert = tiny_model_dir("bert")
    sel = select(bert, output=tmp_path / "sel", method="magnitude", top_n=2, split_num=2, epochs=4)
    merged = tmp_path / "merged"
    decompose(sel.output, output=tmp_path / "dec", num_cores=3)
    from mposurgeon.stages.merge import merge

    merge(tmp_path / "dec", output=merged, verify=True)
    assert read_manifest(sel.output).selection == sel.selection
    assert read_manifest(merged).metrics["verify"]["ok"] is True


# -- 14: failing writes ------------------------------------------------------------------------


def _limit_file_size() -> None:  # runs in the child before exec
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_file_size_limit_is_one_line_naming_the_file(artifact: Path, tmp_path: Path) -> None:
    """A real limit: RLIMIT_FSIZE of 64 KiB, below the ~200 KiB merged weights."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mposurgeon", "merge", str(artifact), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "file size limit exceeded writing" in last and str(out) in last, last
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary files


def test_no_space_left_names_the_file_in_the_output(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A full disk cannot be made here: `Path.write_text` of the manifest is monkeypatched to
    raise OSError(ENOSPC), as the kernel would."""
    import errno

    real = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == MANIFEST_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "out"
    result = run_cli(capsys, "merge", artifact, "-o", out)
    needle = f"no space left on device writing {out / MANIFEST_NAME}"
    line = assert_one_line_error(result, 1, needle)
    assert ".tmp-" not in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(artifact: Path, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = run_cli(capsys, "merge", artifact, "-o", parent / "out")
        assert_one_line_error(result, 1, "cannot write", "permission denied")
    finally:
        parent.chmod(0o755)


# -- 22: concurrent runs claim distinct versions -----------------------------------------------


def test_concurrent_runs_get_distinct_versions(artifact: Path, tmp_path: Path) -> None:
    """Two threads plan the default output before either publishes: both must succeed."""
    options = StageOptions(workdir=tmp_path / "wd")
    inp = open_input(artifact, options)
    planned = threading.Barrier(2)
    outputs: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out = plan_output(inp, options, "merge")
            planned.wait(timeout=30)  # both have planned: neither has published
            with atomic_directory(out) as tmp:
                (tmp / "weights").write_text(str(threading.get_ident()))
            outputs.append(out)
        except BaseException as err:  # handed to the test thread
            planned.abort()
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in outputs) == ["v1-merge", "v2-merge"]
    assert all((p / "weights").is_file() for p in outputs)


def test_a_failed_run_releases_its_claimed_version(artifact: Path, tmp_path: Path) -> None:
    options = StageOptions(workdir=tmp_path / "wd")
    inp = open_input(artifact, options)
    out = plan_output(inp, options, "merge")
    assert out.is_dir()  # claimed
    with pytest.raises(RuntimeError), atomic_directory(out):
        raise RuntimeError("the stage failed")
    assert not out.exists()
    assert plan_output(inp, options, "merge").name == "v1-merge"


# -- 23: pickles of Python objects -------------------------------------------------------------


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


class _Custom:
    pass


@pytest.mark.parametrize("payload", [_Payload(), _Custom()], ids=["reduce", "class"])
def test_pickle_of_python_objects_is_named_as_such(tmp_path: Path, payload: object) -> None:
    torch.save({"w": torch.zeros(2), "x": payload}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ArtifactError) as info:
        open_tensors(tmp_path)
    message = str(info.value)
    assert "holds Python objects" in message and "will not be loaded" in message
    assert "truncated" not in message and "re-download" not in (info.value.hint or "")


# -- 24: missing local paths, temporary directories of killed runs -----------------------------


def test_missing_path_under_an_existing_directory_is_not_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"^no such file or directory: out/model$"):
        resolve_model("out/model")
    result = run_cli(capsys, "inspect", "out/model")
    assert result.code == 4 and "no such file or directory: out/model" in result.err


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from mposurgeon.artifact.store import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporary_directory_of_a_killed_run_is_cleaned_on_the_next_write(tmp_path: Path) -> None:
    final = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(final)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".out.tmp-")
    # a live run's temporary directory (this process) is never touched
    with atomic_directory(tmp_path / "other") as live_tmp:
        with atomic_directory(final) as tmp:
            (tmp / "ok").write_text("ok")
        assert live_tmp.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
