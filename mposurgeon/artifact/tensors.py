"""Lazy reading and sharded writing of checkpoint tensors (safetensors, legacy `pytorch_model.bin`).

`TensorReader` opens a checkpoint without loading its tensors: shapes and dtypes come from the
safetensors headers, and each `get` reads one tensor from a memory map. `ShardedWriter` writes
tensors one by one, straight to disk, into shards of bounded size, named and indexed as
`save_pretrained` does.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import torch
from safetensors import SafetensorError, safe_open

from mposurgeon.artifact.store import sha256_file, write_error
from mposurgeon.errors import ArtifactError, UsageError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
#: What `open_tensors` looks for in a directory, in order of preference.
WEIGHTS_NAMES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    TORCH_WEIGHTS_NAME,
    TORCH_WEIGHTS_INDEX_NAME,
)

_CORRUPT_HINT = "re-create it or re-download the model"

# safetensors header dtype names -> torch dtypes (newer torch dtypes only where torch has them).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}


def _corrupted(path: Path, reason: object) -> ArtifactError:
    return ArtifactError(
        f"{path.name} is truncated or corrupted ({reason})",
        hint=f"{_CORRUPT_HINT} (the file is {path})",
    )


#: Bytes `TensorReader.get` hands out from one memory map of a safetensors file before it maps
#: the file afresh. The pages a map has read stay in the process's resident set until the map
#: is dropped (the kernel may reclaim them, but they count), so a one-file checkpoint of 2 GB
#: would be resident whole by its last tensor; re-mapping keeps the input's resident pages to
#: this window plus the tensors still held (each keeps its own map alive). Re-mapping costs a
#: header parse: 16 ms for a 2,000-tensor header on a loaded 2-core machine, so ~10 of them
#: for a 2.2 GB file.
MAP_WINDOW = 256 * 2**20
#: Tensors under this size are copied out of the map by `TensorReader.get` (see there).
PINNED_COPY_BYTES = 2**20


class TensorReader(Mapping[str, torch.Tensor]):
    """Lazy, read-only view of the tensors of one checkpoint (one or several files).

    One file at a time is open: `get` maps (safetensors) or loads (a legacy `pytorch_model.bin`,
    with `torch.load(weights_only=True, mmap=True)` where its format allows memory mapping) the
    file that holds the key and drops the previous one, so streaming in `keys()` order holds one
    shard, never the whole checkpoint; a safetensors file is mapped afresh every `MAP_WINDOW`
    bytes, so its pages read before do not stay resident, and a tensor under
    `PINNED_COPY_BYTES` is returned as a copy, so that holding it does not pin its map. Tensors
    returned by `get` stay valid.
    """

    def __init__(self, files: list[Path], key_to_file: dict[str, Path] | None = None) -> None:
        """Open `files` (safetensors or torch pickles); `key_to_file` comes from an index.

        Every safetensors header is read (and checked) here; the data of one file at a time is
        then memory-mapped by `get`, so streaming a sharded checkpoint in `keys()` order keeps
        one shard's pages resident, not the whole checkpoint's.
        """
        self._files = list(files)
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}  # key -> (shape, dtype)
        self._open: tuple[Path, Any] | None = None  # the one open file: safetensors or torch
        self._window = 0  # bytes handed out from the current safetensors map
        self._torch: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # .bin key -> meta
        self._key_to_file: dict[str, Path] = {}
        self._metadata: dict[str, str] = {}
        held: dict[Path, set[str]] = {}
        for i, path in enumerate(self._files):
            if path.suffix != ".safetensors":
                # read for the shapes and dtypes only; `get` loads the file again when needed
                state = self._load_torch(path)
                for key, tensor in state.items():
                    self._torch[key] = (tuple(tensor.shape), tensor.dtype)
                    held.setdefault(path, set()).add(key)
                del state
                continue
            handle = self._open_safetensors(path)
            if i == 0:
                self._metadata = dict(handle.metadata() or {})
            held[path] = set(handle.keys())
            for key in handle.keys():
                sl = handle.get_slice(key)
                self._headers[key] = (tuple(sl.get_shape()), sl.get_dtype())
            del handle
        if key_to_file is None:
            key_to_file = {key: path for path, keys in held.items() for key in keys}
        else:
            # The index decides which file holds a key; it must not point into the void.
            for key, path in key_to_file.items():
                if key not in held.get(path, ()):
                    raise ArtifactError(
                        f"{path.name} lacks tensor {key!r} that its index lists",
                        hint=_CORRUPT_HINT,
                    )
        order = {path: i for i, path in enumerate(self._files)}
        self._key_to_file = dict(
            sorted(key_to_file.items(), key=lambda kv: (order.get(kv[1], 0), kv[0]))
        )

    @staticmethod
    def _open_safetensors(path: Path) -> Any:
        # safe_open parses the header and checks that the data section covers exactly what the
        # header describes (file size == 8 + header length + last data offset), so a truncated
        # or padded file is reported here, at open time, not halfway through a stage.
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except SafetensorError as err:
            raise _corrupted(path, err) from err
        except OSError as err:
            raise ArtifactError(f"cannot read {path}: {err.strerror or err}") from err

    @staticmethod
    def _load_torch(path: Path) -> dict[str, torch.Tensor]:
        def load(mmap: bool) -> Any:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

        try:
            try:
                state = load(mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # legacy (non-zip) format cannot be memory-mapped
                    raise
                state = load(mmap=False)
        except Exception as err:  # torch raises many kinds: UnpicklingError, RuntimeError, EOFError
            inner = err.__context__ or err  # weights_only wraps the unpickler's own error
            text = (str(inner).strip().splitlines() or [type(inner).__name__])[0].split(". ")[0]
            # The weights-only unpickler refused something (a class, a function, an opcode):
            # the file is a pickle of Python objects, not damaged tensors.
            if isinstance(err, pickle.UnpicklingError) and (
                "Weights only load failed" in str(err) or "Unsupported global" in str(err)
            ):
                raise ArtifactError(
                    f"{path.name} holds Python objects besides tensors and will not be loaded "
                    f"(torch.load(weights_only=True) refused it: {text})",
                    hint="convert it to safetensors with a tool you trust, then pass that "
                    f"directory (the file is {path})",
                ) from err
            raise _corrupted(path, text) from err
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ArtifactError(
                f"{path.name} is not a flat state dict of tensors",
                hint="save the model with save_pretrained(safe_serialization=True) and pass that",
            )
        return state

    # -- queries -----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in streaming order: file by file, sorted by name within a file."""
        return list(self._key_to_file)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_file

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._key_to_file)

    def _file_of(self, key: str) -> Path:
        try:
            return self._key_to_file[key]
        except KeyError:
            raise KeyError(f"no tensor {key!r} in {self._files[0].parent}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key`, read from the header without loading the data."""
        self._file_of(key)
        if key in self._headers:
            return self._headers[key][0]
        return self._torch[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of tensor `key`, read from the header without loading the data."""
        path = self._file_of(key)
        if key not in self._headers:
            return self._torch[key][1]
        name = self._headers[key][1]
        try:
            return _SAFETENSORS_DTYPES[name]
        except KeyError:
            raise ArtifactError(
                f"{path.name}: tensor {key!r} has dtype {name}, which mposurgeon does not handle",
                hint="convert the checkpoint to float32, float16 or bfloat16 first",
            ) from None

    def nbytes(self, key: str) -> int:
        """Size of tensor `key` in bytes (numel * element size)."""
        numel = 1
        for dim in self.shape(key):
            numel *= dim
        return numel * self.dtype(key).itemsize

    def __getitem__(self, key: str) -> torch.Tensor:
        """`get(key)`: a reader is a read-only mapping of tensor name to tensor."""
        return self.get(key)

    def get(self, key: str) -> torch.Tensor:
        """Load tensor `key` (a CPU tensor backed by the file's memory map where possible)."""
        path = self._file_of(key)
        if self._open is None or self._open[0] != path or self._window >= MAP_WINDOW:
            self._open = None  # unmap the previous file (or window) before mapping the next
            self._window = 0
            if key in self._headers:
                self._open = (path, self._open_safetensors(path))
            else:
                self._open = (path, self._load_torch(path))
        handle = self._open[1]
        if isinstance(handle, dict):
            return handle[key]
        try:
            tensor = handle.get_tensor(key)
        except SafetensorError as err:
            raise _corrupted(path, err) from err
        nbytes = tensor.numel() * tensor.element_size()
        self._window += nbytes
        # a small tensor held on (a norm's weight buffered by a writer) would keep its whole
        # map, and every page read through it, resident: a copy costs less
        return tensor.clone() if nbytes < PINNED_COPY_BYTES else tensor

    @property
    def files(self) -> list[Path]:
        """The tensor files this reader reads (shards in index order)."""
        return list(self._files)

    @property
    def metadata(self) -> dict[str, str]:
        """Header metadata of the first file (`{"format": "pt"}` from transformers)."""
        return dict(self._metadata)

    def close(self) -> None:
        """Drop the memory maps; tensors returned by `get` stay valid."""
        self._open = None
        self._headers.clear()
        self._torch.clear()
        self._key_to_file.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_index(index_path: Path) -> dict[str, Path]:
    """Map tensor name -> shard path from a `*.index.json` file."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        mapping = {str(k): index_path.parent / str(v) for k, v in weight_map.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupted(index_path, f"bad index: {err}") from err
    for shard in dict.fromkeys(mapping.values()):
        if shard.parent != index_path.parent:
            raise _corrupted(index_path, f"shard {shard.name!r} outside the directory")
        if not shard.is_file():
            raise ArtifactError(
                f"{shard.name} listed in {index_path.name} is missing from {index_path.parent}",
                hint=_CORRUPT_HINT,
            )
    return mapping


def _open_index(index_path: Path) -> TensorReader:
    mapping = _read_index(index_path)
    return TensorReader(sorted(set(mapping.values())), key_to_file=mapping)


def _weights_file(path: Path) -> Path:
    """The weights file (or shard index) that `open_tensors(path)` reads first."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHTS_NAMES:
            candidate = path / name
            if candidate.is_file():
                return candidate
        raise ArtifactError(
            f"no weights in {path}: looked for {', '.join(WEIGHTS_NAMES)}",
            hint="pass a Hugging Face model directory saved with save_pretrained, or an artifact",
        )
    if not path.is_file():
        raise ArtifactError(
            f"no such weights file: {path}", hint="check the path, or pass the model directory"
        )
    if path.name.endswith(".index.json") or path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return path
    raise ArtifactError(
        f"{path.name} is not a weights file (expected .safetensors, .bin or .index.json)",
        hint="pass the model directory instead",
    )


def open_tensors(path: Path) -> TensorReader:
    """Open the tensors of a checkpoint lazily.

    `path` is a directory holding `model.safetensors`, a sharded `model.safetensors.index.json`,
    or a legacy `pytorch_model.bin` (or its index), or a path to one `.safetensors`, `.bin` or
    `.index.json` file.
    """
    file = _weights_file(path)
    if file.name.endswith(".index.json"):
        return _open_index(file)
    return TensorReader([file])


def tensor_files(path: Path) -> list[Path]:
    """The files `open_tensors(path)` reads (its shards, for an index), without opening them."""
    file = _weights_file(path)
    if file.name.endswith(".index.json"):
        return sorted(set(_read_index(file).values()))
    return [file]


#: The output shard size (bytes) `auto` gives for a one-file input, and the most it gives for
#: any. `ShardedWriter` writes each tensor as it comes, so the size costs no memory; it is a
#: file size: 500 MB keeps models up to ~100M float32 parameters one file and cuts a 14 GB
#: one-file 7B checkpoint (transformers 5 saves 50 GB shards) into 28.
AUTO_SHARD_SIZE = 500 * 10**6


def auto_shard_size(path: Path) -> int:
    """Bytes per output shard when a stage follows its input `path`'s sharding (`auto`).

    A sharded input gives its largest shard file's size, at most `AUTO_SHARD_SIZE`; a one-file
    input gives `AUTO_SHARD_SIZE`, so a small model stays one file and a large one is cut.
    """
    files = tensor_files(path)
    if len(files) == 1:
        return AUTO_SHARD_SIZE
    largest = max(f.stat().st_size for f in files)
    return max(1, min(largest, AUTO_SHARD_SIZE))


# -- writing ---------------------------------------------------------------------------------


class ShardedWriter:
    """Write tensors into `model.safetensors`, or shards plus an index once they exceed a size.

    Each tensor is written to its shard's temporary file as it is added (`_ShardFile`), so the
    writer holds no tensor: a stage's private memory does not grow with the shard size. A shard
    is closed when the next tensor would push its tensor bytes past `max_shard_size`; a tensor
    larger than the limit gets a shard of its own. `max_shard_size="auto"` means
    `AUTO_SHARD_SIZE`; a stage passes `StageOptions.shard_size(input)` to follow its input's
    sharding instead. Each closed shard is hashed (sha256) and flushed to disk in two
    background threads while the next one is written. `close()` waits for those, gives the
    shards their final names (`model-00001-of-00003.safetensors`, ...) and writes
    `model.safetensors.index.json`; `checksums()` then lists the shards' digests.
    """

    def __init__(
        self, directory: Path, max_shard_size: int | Literal["auto"], prefix: str = "model"
    ) -> None:
        """Write into existing `directory`; `max_shard_size` is in bytes (or "auto")."""
        if max_shard_size == "auto":
            max_shard_size = AUTO_SHARD_SIZE
        if not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
        self.directory = Path(directory)
        self.max_shard_size = max_shard_size
        self.prefix = prefix
        self._shard: _ShardFile | None = None  # the one being written
        self._shards: list[tuple[Path, list[str]]] = []  # closed temp files, keys they hold
        self._seen: set[str] = set()
        self._total_size = 0
        self._closed = False
        self._written: list[Path] = []
        self._pool: ThreadPoolExecutor | None = None
        self._digests: list[Future[str]] = []  # per shard, in shard order
        self._syncs: list[Future[None]] = []
        self._checksums: dict[str, str] = {}
        self._cancel = threading.Event()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write `tensor` under `key` into the current shard, closing it first if full."""
        if self._closed:
            raise ValueError("ShardedWriter is closed")
        if key in self._seen or key == _METADATA_KEY:
            raise ValueError(f"duplicate tensor name {key!r}")
        tensor = tensor.detach().to("cpu")
        size = tensor.numel() * tensor.element_size()
        if self._shard is not None and self._shard.tensor_bytes + size > self.max_shard_size:
            self._close_shard()
        self._current_shard().add(key, tensor)
        self._seen.add(key)
        self._total_size += size

    def _current_shard(self) -> _ShardFile:
        """The shard being written; a new temporary file if none is."""
        if self._shard is None:
            index = len(self._shards) + 1
            tmp = self.directory / f".{self.prefix}-tmp-{index:05d}.safetensors"
            self._shard = _ShardFile(tmp, _header_reserve(self.max_shard_size))
        return self._shard

    def _close_shard(self) -> None:
        """Finish the current shard (an empty one if none was started) and queue its hashing
        and flush to disk."""
        shard = self._current_shard()
        self._shard = None
        shard.finish()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mposurgeon-shard")
        self._syncs.append(self._pool.submit(_fsync_file, shard.path))
        self._digests.append(self._pool.submit(sha256_file, shard.path, self._cancel))
        self._shards.append((shard.path, shard.keys()))

    def close(self) -> list[Path]:
        """Write the last shard, name the shards and write the index; return the files written."""
        if self._closed:
            return list(self._written)
        if self._shard is not None or not self._shards:
            self._close_shard()
        self._closed = True
        try:
            digests = [d.result() for d in self._digests]
            for (tmp, _), sync in zip(self._shards, self._syncs, strict=True):
                try:
                    sync.result()
                except OSError as err:
                    raise write_error(tmp, err) from err
        finally:
            self._shutdown()
        count = len(self._shards)
        if count == 1:
            final = self.directory / f"{self.prefix}.safetensors"
            _replace(self._shards[0][0], final)
            self._written = [final]
            self._checksums = {final.name: digests[0]}
            return [final]
        weight_map: dict[str, str] = {}
        for i, (tmp, keys) in enumerate(self._shards, start=1):
            final = self.directory / f"{self.prefix}-{i:05d}-of-{count:05d}.safetensors"
            _replace(tmp, final)
            self._written.append(final)
            self._checksums[final.name] = digests[i - 1]
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
        index_path = self.directory / f"{self.prefix}.safetensors.index.json"
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        try:
            index_path.write_text(text, encoding="utf-8")
        except OSError as err:
            raise write_error(index_path, err) from err
        self._written.append(index_path)
        return list(self._written)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # the directory's owner (atomic_directory) removes the partial files
            if self._shard is not None:
                self._shard.abandon()
                self._shard = None
            self._closed = True
            self._cancel.set()
            self._shutdown()

    def checksums(self) -> dict[str, str]:
        """sha256 of each shard file by name (relative to the directory), once closed."""
        if not self._closed:
            raise ValueError("ShardedWriter is still open")
        return dict(self._checksums)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


#: The header key safetensors keeps for the file's metadata (no tensor may have it).
_METADATA_KEY = "__metadata__"
#: torch dtypes -> safetensors header dtype names.
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
#: A shard's header padding is at most 1/this of its tensor bytes, else the file is rewritten:
#: with at most 1 MiB reserved, only files under 64 MB are, a copy of tens of milliseconds
#: (1/256 had MiniLM's 90 MB file rewritten: its merge took 16% longer).
_MOST_PADDING = 64
#: Tensors are laid out at multiples of this many bytes from the data section's start (which
#: is itself aligned so), as safetensors' own writer lays them out.
_ALIGNMENT = 8


def _header_reserve(max_shard_size: int) -> int:
    """Bytes reserved at the head of a shard for its header: 1/512 of the shard size, between
    4 KiB (~35 tensor entries of ~110 bytes) and 1 MiB (~9,000), a multiple of 8."""
    return min(max(max_shard_size // 512, 4096), 1 << 20) // _ALIGNMENT * _ALIGNMENT


class _ShardFile:
    """One safetensors file written tensor by tensor, holding no tensor in memory.

    The data section starts at `reserve` bytes; each tensor whose size is a multiple of 8 bytes
    is written there as it is added. The few others (a bfloat16 vector of odd length) are held
    and written last, widest element first, so that every tensor starts 8-byte aligned, as
    safetensors lays them out. `finish` writes the header (the metadata {"format": "pt"}) into
    the reserved head, padded with spaces as the format allows. A header larger than the
    reservation (thousands of tensors in one shard), or padding more than 1/`_MOST_PADDING` of
    the data (a small model's only file, a small last shard), has the file rewritten once,
    header first, without padding: cheap for such files.
    """

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = reserve
        self.tensor_bytes = 0  # bytes of the tensors added
        self._entries: dict[str, dict[str, Any]] = {}
        self._held: list[tuple[str, torch.Tensor]] = []  # sizes not a multiple of 8: written last
        self._offset = 0  # the data section's end so far
        try:
            self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 (closed by finish)
            self._file.seek(reserve)
        except OSError as err:
            raise write_error(path, err) from err

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (on the CPU) under `key`, or hold it for the end if unaligned."""
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"safetensors cannot store {key!r}: dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        self.tensor_bytes += size
        if size % _ALIGNMENT:
            self._held.append((key, tensor.clone()))  # a copy: a view keeps no storage alive
            self._entries[key] = {}  # placed by finish, in the order keys were added
        else:
            self._write(key, tensor)

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        assert self._file is not None
        size = tensor.numel() * tensor.element_size()
        self._entries[key] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        if size:
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            try:
                self._file.write(flat.numpy())
            except OSError as err:
                raise write_error(self.path, err) from err
        self._offset += size

    def keys(self) -> list[str]:
        return list(self._entries)

    def finish(self) -> None:
        """Write the held tensors and the header; close the file."""
        for key, tensor in sorted(self._held, key=lambda kt: -kt[1].element_size()):
            self._write(key, tensor)
        self._held = []
        header = json.dumps(
            {_METADATA_KEY: {"format": "pt"}} | self._entries, separators=(",", ":")
        ).encode()
        assert self._file is not None
        padding = self.reserve - 8 - len(header)
        in_place = 0 <= padding * _MOST_PADDING <= self._offset
        try:
            if in_place:
                self._file.seek(0)
                self._file.write(_header_bytes(header, self.reserve - 8))
            self._file.close()
            if not in_place:
                self._rewrite(header)
        except OSError as err:
            raise write_error(self.path, err) from err
        finally:
            self._file.close()
            self._file = None

    def _rewrite(self, header: bytes) -> None:
        """Write the file again with `header` first and the data section after it."""
        length = -(-(8 + len(header)) // _ALIGNMENT) * _ALIGNMENT - 8
        fresh = self.path.with_name(self.path.name + ".rewrite")
        with open(self.path, "rb") as src, open(fresh, "wb") as dst:
            dst.write(_header_bytes(header, length))
            src.seek(self.reserve)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(fresh, self.path)

    def abandon(self) -> None:
        """Close the file unfinished (its directory's owner removes it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._held = []


def _header_bytes(header: bytes, length: int) -> bytes:
    """The file's head: `header`'s length (`length`, little-endian u64) and `header` padded
    with spaces to `length` bytes."""
    return struct.pack("<Q", length) + header + b" " * (length - len(header))


def _replace(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as err:
        raise write_error(dst, err) from err


def _fsync_file(path: Path) -> None:
    """Flush a written shard to stable storage (in a background thread, beside its hashing)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from a size: an int, or text like "5GB" (10**9 units), "2GiB" (2**30), "100KB"."""
    if isinstance(text, bool):
        raise UsageError(
            f"invalid size {text!r}", hint='write a size like "5GB", "500MB" or "2GiB"'
        )
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise UsageError(
                f"invalid size {text!r}", hint='write a size like "5GB", "500MB" or "2GiB"'
            )
        number, unit = match.groups()
        value = int(float(number) * _SIZE_UNITS[(unit or "").lower()])
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}", hint='for example "5GB"')
    return value
