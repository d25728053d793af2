"""Memory bounded at default options (issue 17, item 2).

At `max_shard_size="auto"` (the default) a stage's output follows its input's sharding: no
output shard is larger than the input's largest shard (plus one tensor), and the tensors are
bitwise those an explicit large `max_shard_size` gives. `ShardedWriter` holds no tensor: each
is written to its shard's file as it is added (checked with weak references, never timed).
"""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import mposurgeon
from mposurgeon.artifact import tensors as tensors_module
from mposurgeon.artifact.manifest import read_manifest
from mposurgeon.artifact.tensors import (
    AUTO_SHARD_SIZE,
    ShardedWriter,
    TensorReader,
    auto_shard_size,
    open_tensors,
    tensor_files,
)
from mposurgeon.errors import UsageError
from mposurgeon.stages.common import StageOptions

#: transformers' `max_shard_size` for the sharded tiny Llama: 4 shards of ~40 KB.
INPUT_SHARD = "40KB"
#: An explicit size larger than every test output: one file, the reference content.
LARGE = "10GB"

Spy = list[dict[str, int]]  # per shard written: tensor name -> bytes


@pytest.fixture(scope="module")
def sharded_llama(tiny_model_dir: Callable[[str], Path], tmp_path_factory) -> Path:
    """The tiny Llama saved by transformers in several ~40 KB shards (config and tokenizer
    copied beside them)."""
    source = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("sharded-llama") / "model"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(out, max_shard_size=INPUT_SHARD)
    for file in source.iterdir():
        if not (out / file.name).exists() and not file.name.endswith(".safetensors"):
            shutil.copyfile(file, out / file.name)
    assert len(tensor_files(out)) >= 3
    return out


@pytest.fixture
def shard_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    """Every shard `ShardedWriter` finishes, as {name: bytes}, in order."""
    written: Spy = []
    real = tensors_module._ShardFile.finish

    def spy(shard: tensors_module._ShardFile) -> None:
        real(shard)
        written.append(
            {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in shard._entries.items()}
        )

    monkeypatch.setattr(tensors_module._ShardFile, "finish", spy)
    yield written


def _largest_file(directory: Path) -> int:
    return max(f.stat().st_size for f in tensor_files(directory))


def _largest_tensor(directory: Path) -> int:
    with open_tensors(directory) as reader:
        return max(reader.nbytes(key) for key in reader.keys())


def _tensor_bytes(directory: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint as (dtype, shape, raw bytes): bitwise comparable."""
    with open_tensors(directory) as reader:
        return {
            key: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
            for key in reader.keys()
            for t in [reader.get(key)]
        }


def _check_follows_input(source: Path, out: Path, reference: Path, spy: Spy) -> None:
    """`out` (written at defaults from `source`) is sharded like `source`, the tensors of
    every shard the writer finished fit one input shard (or are one tensor), and its tensors
    and module records are `reference`'s."""
    limit = _largest_file(source)
    files = tensor_files(out)
    assert len(files) > 1, "a sharded input gives a sharded output"
    assert all(f.stat().st_size <= limit + _largest_tensor(out) for f in files)
    assert spy and all(sum(shard.values()) <= limit or len(shard) == 1 for shard in spy)
    assert _tensor_bytes(out) == _tensor_bytes(reference)
    assert len(tensor_files(reference)) == 1
    ours, theirs = read_manifest(out), read_manifest(reference)
    assert ours.modules == theirs.modules
    assert ours.options["max_shard_size"] == "auto"
    assert theirs.options["max_shard_size"] == 10**10


def test_decompose_at_defaults_follows_input_shards(
    sharded_llama: Path, tmp_path: Path, shard_spy: Spy
) -> None:
    mposurgeon.decompose(sharded_llama, output=tmp_path / "auto")
    spied = list(shard_spy)
    mposurgeon.decompose(sharded_llama, output=tmp_path / "large", max_shard_size=LARGE)
    _check_follows_input(sharded_llama, tmp_path / "auto", tmp_path / "large", spied)


@pytest.fixture(scope="module")
def sharded_artifact(sharded_llama: Path, tmp_path_factory) -> Path:
    """The sharded tiny Llama decomposed into an artifact of ~40 KB shards."""
    art = tmp_path_factory.mktemp("sharded-artifact") / "dec"
    mposurgeon.decompose(sharded_llama, output=art, max_shard_size=INPUT_SHARD)
    assert len(tensor_files(art)) > 1
    return art


def test_truncate_at_defaults_follows_input_shards(
    sharded_artifact: Path, tmp_path: Path, shard_spy: Spy
) -> None:
    mposurgeon.truncate(sharded_artifact, output=tmp_path / "auto", param_ratio=0.5)
    spied = list(shard_spy)
    mposurgeon.truncate(
        sharded_artifact, output=tmp_path / "large", param_ratio=0.5, max_shard_size=LARGE
    )
    _check_follows_input(sharded_artifact, tmp_path / "auto", tmp_path / "large", spied)


def test_merge_at_defaults_follows_input_shards(
    sharded_artifact: Path, sharded_llama: Path, tmp_path: Path, shard_spy: Spy
) -> None:
    mposurgeon.merge(sharded_artifact, output=tmp_path / "auto")
    spied = list(shard_spy)
    mposurgeon.merge(sharded_artifact, output=tmp_path / "large", max_shard_size=LARGE)
    _check_follows_input(sharded_artifact, tmp_path / "auto", tmp_path / "large", spied)
    # merged back, the dense tensors are the input's names again
    assert set(_tensor_bytes(tmp_path / "auto")) == set(_tensor_bytes(sharded_llama))


@pytest.mark.parametrize("stage", ["select", "prune"])
def test_select_and_prune_at_defaults_follow_input_shards(
    stage: str, sharded_llama: Path, tmp_path: Path, shard_spy: Spy
) -> None:
    def run(out: Path, **kwargs: object) -> None:
        if stage == "select":
            mposurgeon.select(sharded_llama, output=out, method="magnitude", top_n=1, **kwargs)
        else:
            mposurgeon.prune(sharded_llama, output=out, sparsity=0.5, **kwargs)

    run(tmp_path / "auto")
    spied = list(shard_spy)
    run(tmp_path / "large", max_shard_size=LARGE)
    _check_follows_input(sharded_llama, tmp_path / "auto", tmp_path / "large", spied)


def test_explicit_max_shard_size_is_kept(sharded_llama: Path, tmp_path: Path) -> None:
    mposurgeon.decompose(sharded_llama, output=tmp_path / "small", max_shard_size="15KB")
    files = tensor_files(tmp_path / "small")
    largest = _largest_tensor(tmp_path / "small")
    assert len(files) > len(tensor_files(sharded_llama))
    # a shard holds at most 15 KB of tensor data, or one larger tensor alone
    with open_tensors(tmp_path / "small") as reader:
        for file in files:
            with TensorReader([file]) as shard:
                data = sum(reader.nbytes(k) for k in shard.keys())
                assert data <= 15_000 or (len(shard) == 1 and data <= largest)
    assert read_manifest(tmp_path / "small").options["max_shard_size"] == 15_000


def test_auto_shard_size_follows_the_largest_input_shard(
    sharded_llama: Path, tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    largest = _largest_file(sharded_llama)
    assert auto_shard_size(sharded_llama) == largest
    assert auto_shard_size(sharded_llama / "model.safetensors.index.json") == largest
    # one file: no sharding to follow, the fixed size (a small model stays one file)
    assert auto_shard_size(tiny_model_dir("llama")) == AUTO_SHARD_SIZE
    # shards larger than that size are cut to it
    monkeypatch.setattr(tensors_module, "AUTO_SHARD_SIZE", largest // 2)
    assert auto_shard_size(sharded_llama) == largest // 2


@pytest.mark.parametrize(
    ("given", "parsed"),
    [("auto", "auto"), (" AUTO ", "auto"), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), (7, 7)],
)
def test_max_shard_size_option_parses(given: object, parsed: object, tmp_path: Path) -> None:
    opts = StageOptions(max_shard_size=given)
    assert opts.max_shard_size == parsed
    assert StageOptions().max_shard_size == "auto"
    if parsed != "auto":
        assert opts.shard_size(tmp_path) == parsed  # explicit: the input is not even read


@pytest.mark.parametrize("given", ["automatic", "0", "-1GB", "lots"])
def test_bad_max_shard_size_is_a_usage_error(given: str) -> None:
    with pytest.raises(UsageError, match="size"):
        StageOptions(max_shard_size=given)


def test_writer_holds_no_tensor_and_cuts_shards_at_the_limit(
    tmp_path: Path, shard_spy: Spy
) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = (torch.randint(1, 300, (80,), generator=gen) * 2).tolist()  # 8-byte multiples
    limit = 4_000  # bytes
    with ShardedWriter(tmp_path, limit) as writer:
        for i, n in enumerate(sizes):
            tensor = torch.randn(n, generator=gen)
            alive = weakref.ref(tensor)
            writer.add(f"t{i}", tensor)
            del tensor
            assert alive() is None, "written as added: the writer keeps no tensor"
        writer.add("big", torch.randn(3 * limit // 4, generator=gen).repeat(2))  # over the limit
    assert all(sum(shard.values()) <= limit for shard in shard_spy if "big" not in shard)
    assert {"big": 6 * limit} in shard_spy  # a tensor over the limit is a shard of its own
    assert sum(len(shard) for shard in shard_spy) == len(sizes) + 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shard_spy)


def test_writer_auto_without_an_input_is_the_one_file_size(tmp_path: Path) -> None:
    assert ShardedWriter(tmp_path, "auto").max_shard_size == AUTO_SHARD_SIZE
    with pytest.raises(ValueError, match="positive"):
        ShardedWriter(tmp_path, 0)


def test_legacy_bin_shards_are_loaded_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    shards = {
        f"pytorch_model-0000{i}-of-00003.bin": {
            f"l{i}.{k}": torch.randn(8, 4, generator=gen) for k in "ab"
        }  # fmt: skip
        for i in range(1, 4)
    }
    weight_map = {}
    for name, state in shards.items():
        torch.save(state, tmp_path / name)
        weight_map.update(dict.fromkeys(state, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    loads: list[str] = []
    real = TensorReader._load_torch

    def counting(path: Path) -> dict[str, torch.Tensor]:
        loads.append(path.name)
        return real(path)

    monkeypatch.setattr(TensorReader, "_load_torch", staticmethod(counting))
    with open_tensors(tmp_path) as reader:
        assert sorted(loads) == sorted(shards)  # shapes and dtypes, read once at open
        assert reader.shape("l2.a") == (8, 4) and reader.dtype("l2.a") == torch.float32
        loads.clear()
        got = {key: reader.get(key) for key in reader.keys()}
        assert loads == list(shards)  # streaming: each file loaded once, in order
    for state in shards.values():
        for key, tensor in state.items():
            assert torch.equal(got[key], tensor)


def test_reader_maps_a_large_file_afresh_every_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    ref = {f"w{i:02d}": torch.randn(250, generator=gen) for i in range(12)}  # 1000 bytes each
    save_file(ref, tmp_path / "model.safetensors")
    opened: list[Path] = []
    real = TensorReader._open_safetensors

    def counting(path: Path) -> object:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(tensors_module, "MAP_WINDOW", 3_000)
    monkeypatch.setattr(TensorReader, "_open_safetensors", staticmethod(counting))
    with open_tensors(tmp_path) as reader:
        opened.clear()  # the header, read at open
        got = {key: reader.get(key) for key in reader.keys()}
        # a map hands out 3 tensors (3,000 bytes), then the file is mapped afresh
        assert len(opened) == 4
    for key, tensor in ref.items():  # tensors from dropped maps stay valid
        assert torch.equal(got[key], tensor)


def test_shards_are_as_readable_as_any_new_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    with ShardedWriter(tmp_path, 1_000) as writer:
        for i in range(3):
            writer.add(f"w{i}", torch.zeros(200))
    for file in tensor_files(tmp_path):
        assert file.stat().st_mode & 0o777 == expected, file.name
