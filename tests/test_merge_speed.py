"""merge does each piece of work once and overlaps its hashing with its contractions (issue 17,
item 4), keeping its guarantees: a damaged input fails before anything is published, the
output's checksums are its files' sha256, and the merged weights are bitwise the original.

Counted through wrappers (tensors read, files and cores hashed, in which thread), never timed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mposurgeon
from mposurgeon.artifact import manifest as manifest_module
from mposurgeon.artifact import store as store_module
from mposurgeon.artifact import tensors as tensors_module
from mposurgeon.artifact.manifest import MANIFEST_NAME, load_artifact, read_manifest
from mposurgeon.artifact.tensors import TensorReader, tensor_files
from mposurgeon.errors import ArtifactError
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.stages import merge as merge_stage
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with random weights, saved in bfloat16."""
    return build_tiny_model(
        "llama", tmp_path_factory.mktemp("bf16-llama") / "m", dtype=torch.bfloat16
    )


@pytest.fixture(scope="module")
def dec(bf16_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`bf16_llama` decomposed at defaults: float32 cores, most modules with a fixup."""
    out = tmp_path_factory.mktemp("bf16-llama-dec") / "dec"
    mposurgeon.decompose(bf16_llama, output=out)
    return out


def _fixup_records(artifact: Path) -> dict[str, MPORecord]:
    modules = read_manifest(artifact).modules.values()
    return {r.name: r for r in modules if isinstance(r, MPORecord) and r.fixup is not None}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in tensor_files(directory):
        out.update(load_file(path))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[Path]]:
    """Every file `sha256_file` hashes, with how many times (wherever it is called from)."""
    counts: Counter[Path] = Counter()
    real = store_module.sha256_file
    lock = threading.Lock()

    def counting(path: Path, cancel: threading.Event | None = None) -> str:
        with lock:
            counts[Path(path).resolve()] += 1
        return real(path, cancel)

    for module in (store_module, manifest_module, tensors_module):
        monkeypatch.setattr(module, "sha256_file", counting)
    yield counts


def test_each_tensor_is_read_once(dec: Path, tmp_path: Path, monkeypatch) -> None:
    reads: Counter[str] = Counter()
    real = TensorReader.get

    def counting(self: TensorReader, key: str) -> torch.Tensor:
        reads[key] += 1
        return real(self, key)

    monkeypatch.setattr(TensorReader, "get", counting)
    mposurgeon.merge(dec, output=tmp_path / "merged")
    assert reads and max(reads.values()) == 1, reads.most_common(3)
    records = _fixup_records(dec)
    assert records
    for rec in records.values():  # the cores, read by the contraction and the fingerprint
        assert all(reads[key] == 1 for key in rec.core_keys() + rec.fixup_keys())


def test_each_file_is_hashed_once(dec: Path, tmp_path: Path, hashed: Counter[Path]) -> None:
    """The input's files are hashed once (its check); the output's once, in the temporary
    directory before it is published (the shards as they were written, the other files for
    the manifest); no file twice."""
    out = tmp_path / "merged"
    mposurgeon.merge(dec, output=out)
    assert hashed and max(hashed.values()) == 1, hashed.most_common(3)
    listed = {(dec / name).resolve() for name in read_manifest(dec).files}
    assert listed <= set(hashed)
    temporary = [
        p for p in hashed if any(d.name.startswith(f".{out.name}.tmp-") for d in p.parents)
    ]
    written = [p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    assert len(temporary) == len(written)
    shards = {p.name for p in tensor_files(out)}
    assert {p.name for p in temporary if p.suffix != ".safetensors"} == {
        p.name for p in written if p.name not in shards
    }
    assert set(hashed) <= listed | set(temporary) | {(dec / MANIFEST_NAME).resolve()}


def test_fixup_fingerprints_are_hashed_once_beside_the_contraction(
    dec: Path, tmp_path: Path, monkeypatch
) -> None:
    """One fingerprint per module with a fixup, each in a thread other than the one that
    contracts, and the weights come back bitwise: the fixups were applied."""
    calls: list[tuple[str, int]] = []
    real = merge_stage.cores_fingerprint

    def recording(cores: list[torch.Tensor]) -> str:
        calls.append((threading.current_thread().name, sum(c.numel() for c in cores)))
        return real(cores)

    monkeypatch.setattr(merge_stage, "cores_fingerprint", recording)
    out = tmp_path / "merged"
    mposurgeon.merge(dec, output=out)
    records = _fixup_records(dec)
    sizes = sorted(sum(math.prod(s) for s in rec.core_shapes()) for rec in records.values())
    assert sorted(n for _, n in calls) == sizes
    assert all(name != threading.main_thread().name for name, _ in calls)


def test_merged_weights_are_bitwise_the_original(
    bf16_llama: Path, dec: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    mposurgeon.merge(dec, output=out)
    merged, original = _weights(out), _weights(bf16_llama)
    assert merged.keys() == original.keys()
    for key, tensor in original.items():
        assert merged[key].dtype == tensor.dtype == torch.bfloat16, key
        assert torch.equal(_bits(merged[key]), _bits(tensor)), key


def test_output_checksums_are_the_files_sha256(dec: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    mposurgeon.merge(dec, output=out)
    files = read_manifest(out).files
    on_disk = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in out.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    assert files == on_disk
    load_artifact(out)  # and the manifest's own check agrees


def _core_offset(shard: Path, key: str) -> int:
    """Byte offset in `shard` of the first entry of tensor `key` (safetensors layout)."""
    with open(shard, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return 8 + length + header[key]["data_offsets"][0]


@pytest.mark.parametrize(
    "value",
    [float("nan"), 0.125],  # a core the method refuses, and one it would merge silently
    ids=["nan", "finite"],
)
def test_a_damaged_core_fails_with_nothing_published(
    dec: Path, tmp_path: Path, value: float
) -> None:
    """A core of a module with a fixup, changed on disk after its artifact was written: merge
    fails on the checksum (which explains any other failure), and writes nothing."""
    damaged = tmp_path / "dec"
    shutil.copytree(dec, damaged)
    rec = next(iter(_fixup_records(damaged).values()))
    key = rec.core_keys()[rec.central_index]
    shard = next(p for p in tensor_files(damaged) if key in load_file(p))
    offset = _core_offset(shard, key)
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", value))
    out = tmp_path / "out" / "merged"
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        mposurgeon.merge(damaged, output=out)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tensors_for_another_device_are_read_and_moved_once() -> None:
    """`_Moved` (merge on a GPU) hands out the same moved tensor for every read of a key; the
    "meta" device stands in for CUDA here (a move there makes a new tensor each time)."""
    from mposurgeon.stages.merge import _Moved

    reads: Counter[str] = Counter()

    class Counting(dict):
        def __getitem__(self, key: str) -> torch.Tensor:
            reads[key] += 1
            return super().__getitem__(key)

    moved = _Moved(Counting(a=torch.ones(2)), torch.device("meta"))
    first = moved["a"]
    assert first.device.type == "meta" and moved["a"] is first
    assert reads == {"a": 1}


def test_merge_process_does_not_import_transformers(
    bf16_llama: Path, dec: Path, tmp_path: Path
) -> None:
    """Importing transformers takes most of a second: a merge of MPO modules needs none of it
    (only `--verify`, a PEFT adapter or an expert export do), so its process leaves it out.
    The layout comes from the cache the fixture's decompose filled (the tests' cache)."""
    script = (
        "import sys\n"
        "from mposurgeon.cli.app import main\n"
        "try:\n    main(['merge', sys.argv[1], '-o', sys.argv[2], '-q'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('transformers' in sys.modules)\n"
    )
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-c", script, str(dec), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    merged, original = _weights(out), _weights(bf16_llama)
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)
