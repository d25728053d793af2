"""Lazy checkpoint reading and sharded safetensors writing (mposurgeon.artifact.tensors)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mposurgeon.artifact.store import sha256_file
from mposurgeon.artifact.tensors import ShardedWriter, open_tensors, parse_size
from mposurgeon.errors import ArtifactError, UsageError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "encoder.layer.0.weight": torch.randn(16, 8, generator=gen),
        "encoder.layer.0.bias": torch.randn(16, generator=gen),
        "encoder.layer.1.weight": torch.randn(16, 16, generator=gen),
        "embeddings.word_embeddings.weight": torch.randn(40, 8, generator=gen),
        "half": torch.randn(4, 4, generator=gen).to(torch.float16),
        "brain": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
    }


def _write(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[Path]:
    with ShardedWriter(directory, max_shard_size) as writer:
        for key, tensor in tensors.items():
            writer.add(key, tensor)
    return writer.close()  # idempotent: returns the same list again


def _assert_same(reader_keys: list[str], get: Callable[[str], torch.Tensor], ref: dict) -> None:
    assert sorted(reader_keys) == sorted(ref)
    for key, tensor in ref.items():
        loaded = get(key)
        assert loaded.dtype == tensor.dtype, key
        assert torch.equal(loaded, tensor), key


def test_single_file_round_trip(tmp_path: Path) -> None:
    ref = _tensors()
    files = _write(tmp_path, ref, max_shard_size=10**9)
    assert files == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp left
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    _assert_same(list(load_file(files[0])), load_file(files[0]).__getitem__, ref)
    with open_tensors(tmp_path) as reader:
        assert reader.files == files
        assert reader.metadata == {"format": "pt"}
        assert reader.keys() == sorted(ref)
        _assert_same(reader.keys(), reader.get, ref)


def test_sharded_round_trip_and_index(tmp_path: Path) -> None:
    ref = _tensors()
    files = _write(tmp_path, ref, max_shard_size=600)  # bytes: forces several shards
    shards = [p for p in files if p.suffix == ".safetensors"]
    count = len(shards)
    assert count >= 3
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    index_path = tmp_path / "model.safetensors.index.json"
    assert files[-1] == index_path
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in ref.values()
    )
    assert set(index["weight_map"]) == set(ref)
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            shard_keys = f.keys()
            assert all(index["weight_map"][key] == shard.name for key in shard_keys)
        part = load_file(shard)
        # Only a tensor over the limit may make a shard exceed it.
        sizes = [t.numel() * t.element_size() for t in part.values()]
        assert sum(sizes) <= 600 or len(sizes) == 1
        merged.update(part)
    _assert_same(list(merged), merged.__getitem__, ref)
    with open_tensors(tmp_path) as reader:
        assert reader.files == shards
        _assert_same(reader.keys(), reader.get, ref)
    with open_tensors(index_path) as reader:  # the index file itself is accepted too
        assert len(reader.keys()) == len(ref)


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    big = torch.zeros(100)  # 400 bytes, limit 100
    files = _write(tmp_path, {"a": torch.zeros(2), "big": big, "b": torch.zeros(2)}, 100)
    index = json.loads(files[-1].read_text())["weight_map"]
    assert len(set(index.values())) == 3
    assert index["big"] not in (index["a"], index["b"])


def test_writer_refuses_duplicates_and_clones_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with ShardedWriter(tmp_path, 10**6) as writer:
        writer.add("w", base)
        writer.add("tied", base)  # same storage under a second name
        writer.add("row", base[1])  # view into a larger storage
        writer.add("t", base.t())  # not contiguous
        writer.add("grad", torch.ones(2, requires_grad=True) * 2)
        with pytest.raises(ValueError, match="duplicate"):
            writer.add("w", base)
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["tied"], base)
    assert torch.equal(loaded["row"], base[1])
    assert torch.equal(loaded["t"], base.t())
    assert torch.equal(loaded["grad"], torch.full((2,), 2.0))


def test_transformers_loads_sharded_output(
    tmp_path: Path, tiny_model_dir: Callable[[str], Path]
) -> None:
    import transformers

    src = tiny_model_dir("gpt2")
    out = tmp_path / "resharded"
    out.mkdir()
    with open_tensors(src) as reader, ShardedWriter(out, 20_000) as writer:
        for key in reader:
            writer.add(key, reader.get(key))
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    assert (out / "model.safetensors.index.json").is_file()
    original = transformers.GPT2LMHeadModel.from_pretrained(src)
    resharded = transformers.GPT2LMHeadModel.from_pretrained(out)
    for (name, a), (_, b) in zip(
        original.state_dict().items(), resharded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_shape_and_dtype_are_lazy(tmp_path: Path) -> None:
    ref = _tensors()
    _write(tmp_path, ref, 10**9)
    with open_tensors(tmp_path) as reader:
        for key, tensor in ref.items():
            assert reader.shape(key) == tuple(tensor.shape)
            assert reader.dtype(key) == tensor.dtype
            assert reader.nbytes(key) == tensor.numel() * tensor.element_size()
            assert key in reader
        assert "missing" not in reader
        assert reader._open is None  # headers only: no data file mapped yet
        assert reader.dtype("brain") == torch.bfloat16
        assert reader.dtype("half") == torch.float16
        reader.get("half")
        assert reader._open is not None and reader._open[0] == tmp_path / "model.safetensors"


def test_pytorch_model_bin(tmp_path: Path) -> None:
    ref = _tensors()
    torch.save(ref, tmp_path / "pytorch_model.bin")
    with open_tensors(tmp_path) as reader:
        assert reader.files == [tmp_path / "pytorch_model.bin"]
        assert reader.metadata == {}
        assert reader.shape("encoder.layer.0.weight") == (16, 8)
        _assert_same(reader.keys(), reader.get, ref)


class Payload:
    """Stands in for arbitrary pickled code: weights_only loading must refuse it."""


def test_pytorch_model_bin_with_code_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin.*weights_only"):
        open_tensors(tmp_path)


def test_truncated_pytorch_model_bin(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(_tensors(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin is truncated or corrupted"):
        open_tensors(tmp_path)


def test_single_safetensors_file_path(tmp_path: Path) -> None:
    save_file({"x": torch.ones(3)}, tmp_path / "weights.safetensors")
    with open_tensors(tmp_path / "weights.safetensors") as reader:
        assert reader.keys() == ["x"]
        assert reader.metadata == {}


def test_truncated_file_is_detected_at_open(tmp_path: Path) -> None:
    _write(tmp_path, _tensors(), 10**9)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        ArtifactError, match=r"model\.safetensors is truncated or corrupted"
    ) as info:
        open_tensors(tmp_path)
    assert "re-download" in (info.value.hint or "")
    assert "\n" not in str(info.value)


def test_garbage_header_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00garbage, not a safetensors file" * 4)
    with pytest.raises(ArtifactError, match=r"model\.safetensors is truncated or corrupted"):
        open_tensors(tmp_path)


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"x": {}}')
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        open_tensors(tmp_path)


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    files = _write(tmp_path, _tensors(), 600)
    files[0].unlink()
    with pytest.raises(ArtifactError, match=files[0].name):
        open_tensors(tmp_path)


def test_missing_weights_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"model\.safetensors.*pytorch_model\.bin"):
        open_tensors(tmp_path)


def test_empty_writer_still_writes_a_valid_file(tmp_path: Path) -> None:
    files = ShardedWriter(tmp_path, 100).close()
    assert files == [tmp_path / "model.safetensors"]
    assert load_file(files[0]) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("100KB", 100_000),
        ("1.5 gb", 1_500_000_000),
        ("4096", 4096),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", 0, "five", True])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_streaming_order_maps_one_shard_at_a_time(tmp_path: Path) -> None:
    ref = _tensors()
    _write(tmp_path, ref, 64)  # tiny shards: several files
    with open_tensors(tmp_path) as reader:
        files = [reader._file_of(k) for k in reader.keys()]
        assert files == sorted(files, key=reader.files.index)  # grouped file by file
        assert len(set(files)) > 1
        opened = []
        for key in reader.keys():
            torch.testing.assert_close(reader.get(key), ref[key])
            opened.append(reader._open[0])
        # each shard is mapped once, in order, and the previous one is dropped
        assert [p for i, p in enumerate(opened) if i == 0 or opened[i - 1] != p] == sorted(
            set(opened), key=reader.files.index
        )


@pytest.mark.parametrize("max_shard_size", [10**6, 3_000])
def test_writer_checksums_are_the_files_sha256(tmp_path: Path, max_shard_size: int) -> None:
    """Shards are hashed in a background thread as they are written; the digests must be
    those of the final files, under their final names."""
    writer = ShardedWriter(tmp_path, max_shard_size)
    with pytest.raises(ValueError, match="still open"):
        writer.checksums()
    with writer:
        for i in range(6):
            writer.add(f"t{i}", torch.full((300,), float(i)))
    sums = writer.checksums()
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert sorted(sums) == shards and (len(shards) > 1) == (max_shard_size == 3_000)
    assert sums == {name: sha256_file(tmp_path / name) for name in shards}


def test_writer_failure_stops_hashing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path, 1_500) as writer:
        for i in range(4):
            writer.add(f"t{i}", torch.zeros(300))
        raise RuntimeError("boom")
    assert writer._pool is None and writer._cancel.is_set()


def _head(path: Path) -> tuple[int, bytes]:
    """A safetensors file's header length and header bytes."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, f.read(length)


def test_streamed_shard_keeps_every_tensor_aligned(tmp_path: Path) -> None:
    """Tensors are written as they come; those whose size is not a multiple of 8 bytes go
    last, widest first, so every tensor starts 8-byte aligned, as safetensors lays them out."""
    gen = torch.Generator().manual_seed(0)
    ref = {
        "odd_bf16": torch.randn(3, generator=gen).to(torch.bfloat16),  # 6 bytes
        "f32": torch.randn(5, 4, generator=gen),
        "odd_u8": torch.arange(5, dtype=torch.uint8),
        "odd_f32": torch.randn(3, generator=gen),  # 12 bytes
        "f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64),
    }
    [file] = _write(tmp_path, ref, 10**6)
    length, header = _head(file)
    assert (8 + length) % 8 == 0 and header.startswith(b"{")
    entries = json.loads(header)
    assert entries.pop("__metadata__") == {"format": "pt"}
    spans = sorted(tuple(e["data_offsets"]) for e in entries.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(spans))  # no holes
    assert file.stat().st_size == 8 + length + spans[-1][1]
    for key, entry in entries.items():
        start, end = entry["data_offsets"]
        width = ref[key].element_size()
        assert start % min(8, width) == 0, key
        assert end - start == ref[key].numel() * width
    # the unaligned ones come last, widest element first
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"])
    assert order[-5:] == ["odd_f32", "scalar", "odd_bf16", "odd_u8", "mask"]
    loaded = load_file(file)
    _assert_same(list(loaded), loaded.__getitem__, ref)


def test_header_larger_than_its_reservation_rewrites_the_shard(tmp_path: Path) -> None:
    """A 100 kB shard reserves 4 KiB for its header; 120 tensors with long names need more:
    the shard is written again, header first, with no reserved gap left and no stray file."""
    gen = torch.Generator().manual_seed(0)
    ref = {f"model.layers.{i}.a.rather.long.tensor.name.weight": torch.randn(4, generator=gen)
           for i in range(120)}  # fmt: skip
    [file] = _write(tmp_path, ref, 100_000)
    length, _ = _head(file)
    assert length + 8 > 4096
    assert file.stat().st_size == 8 + length + 120 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(file)
    _assert_same(list(loaded), loaded.__getitem__, ref)


def test_writer_refuses_the_metadata_key_and_unstorable_dtypes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="__metadata__"), ShardedWriter(tmp_path, 100) as writer:
        writer.add("__metadata__", torch.zeros(2))
    with pytest.raises(ValueError, match="complex128"), ShardedWriter(tmp_path, 100) as writer:
        writer.add("z", torch.zeros(2, dtype=torch.complex128))


def test_full_shard_keeps_its_padded_header_and_a_small_file_is_compact(tmp_path: Path) -> None:
    """A 2 MB shard limit reserves 4 KiB for the header. 1.6 MB of tensors: the header is
    written into the reservation in place (padding under 1/64 of the data). One small tensor:
    the file is rewritten without the padding."""
    gen = torch.Generator().manual_seed(0)
    big = {f"w{i}": torch.randn(100_000, generator=gen) for i in range(4)}  # 1.6 MB
    (tmp_path / "big").mkdir()
    [file] = _write(tmp_path / "big", big, 2 * 10**6)
    length, header = _head(file)
    assert 8 + length == 4096 and header.endswith(b" " * 100)  # padded in place
    assert file.stat().st_size == 4096 + 1_600_000
    loaded = load_file(file)
    _assert_same(list(loaded), loaded.__getitem__, big)
    small = {"w": torch.randn(10, generator=gen)}
    (tmp_path / "small").mkdir()
    [file] = _write(tmp_path / "small", small, 2 * 10**6)
    length, header = _head(file)
    assert file.stat().st_size == 8 + length + 40 and length < 100 and (8 + length) % 8 == 0
    assert torch.equal(load_file(file)["w"], small["w"])
