"""Lazy reading and sharded writing of checkpoint tensors (safetensors, legacy `pytorch_model.bin`).

`TensorReader` opens a checkpoint without loading its tensors: shapes and dtypes come from the
safetensors headers, and each `get` reads one tensor from a memory map. `ShardedWriter` writes
tensors one by one into shards of bounded size, named and indexed as `save_pretrained` does.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
#: any. A stage's private memory grows with its output shard size (`ShardedWriter` holds one
#: shard) and its time does not: merge of a 6-layer TinyLlama-shaped artifact (791 MB out) held
#: 478 / 561 / 725 MB private at 250 MB / 500 MB / 1 GB shards, in the same time (31-53 s on a
#: loaded 2-core machine, no trend). 500 MB keeps models up to ~100M float32 parameters one
#: file and cuts a 14 GB one-file 7B checkpoint (transformers 5 saves 50 GB shards) into 28.
AUTO_SHARD_SIZE = 500 * 10**6


def auto_shard_size(path: Path) -> int:
    """Bytes per output shard when a stage follows its input `path`'s sharding (`auto`).

    A sharded input gives its largest shard file's size, at most `AUTO_SHARD_SIZE`; a one-file
    input gives `AUTO_SHARD_SIZE`, so a small model stays one file and a large one is cut.
    `ShardedWriter` buffers up to one shard, so this bounds a stage's private memory for its
    output by one input shard (and 500 MB), whatever the model's size.
    """
    files = tensor_files(path)
    if len(files) == 1:
        return AUTO_SHARD_SIZE
    largest = max(f.stat().st_size for f in files)
    return max(1, min(largest, AUTO_SHARD_SIZE))


# -- writing ---------------------------------------------------------------------------------


class ShardedWriter:
    """Write tensors into `model.safetensors`, or shards plus an index once they exceed a size.

    Tensors are buffered until the next one would push the shard past `max_shard_size` bytes;
    the buffer is then written to a temporary file, so memory holds at most one shard (tensors
    read from a checkpoint stay backed by its memory map; computed ones are private memory). A
    tensor larger than the limit gets a shard of its own. `max_shard_size="auto"` means
    `AUTO_SHARD_SIZE`; a stage passes `StageOptions.shard_size(input)` to follow its
    input's sharding instead. Each written shard is hashed (sha256) and
    flushed to disk in two background threads while the next one is built. `close()` waits for
    those, gives the shards their final names (`model-00001-of-00003.safetensors`, ...) and
    writes `model.safetensors.index.json`; `checksums()` then lists the shards' digests.
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
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temp file, keys it holds
        self._seen: set[str] = set()
        self._buffer_storages: set[int] = set()  # data pointers of the buffered tensors
        self._total_size = 0
        self._closed = False
        self._written: list[Path] = []
        self._pool: ThreadPoolExecutor | None = None
        self._digests: list[Future[str]] = []  # per shard, in shard order
        self._syncs: list[Future[None]] = []
        self._checksums: dict[str, str] = {}
        self._cancel = threading.Event()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` under `key`; may write a full shard to disk first."""
        if self._closed:
            raise ValueError("ShardedWriter is closed")
        if key in self._seen:
            raise ValueError(f"duplicate tensor name {key!r}")
        tensor = tensor.detach().to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        size = tensor.numel() * tensor.element_size()
        shares = tensor.storage_offset() != 0 or storage.nbytes() != size
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self._flush()
        if shares or storage.data_ptr() in self._buffer_storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        self._buffer_storages.add(tensor.untyped_storage().data_ptr())
        self._seen.add(key)
        self._buffer[key] = tensor
        self._buffer_bytes += size
        self._total_size += size

    def _flush(self) -> None:
        index = len(self._shards) + 1
        tmp = self.directory / f".{self.prefix}-tmp-{index:05d}.safetensors"
        try:
            save_file(self._buffer, str(tmp), metadata={"format": "pt"})
        except SafetensorError as err:  # it wraps the OS error: "... (os error 28)"
            match = _OS_ERROR_RE.search(str(err))
            raise write_error(tmp, int(match[1]) if match else 0) from err
        except OSError as err:
            raise write_error(tmp, err) from err
        try:  # safetensors creates the file 0600; a shard is as readable as any file written
            os.chmod(tmp, _file_mode())
        except OSError as err:
            raise write_error(tmp, err) from err
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mposurgeon-shard")
        self._syncs.append(self._pool.submit(_fsync_file, tmp))
        self._digests.append(self._pool.submit(sha256_file, tmp, self._cancel))
        self._shards.append((tmp, list(self._buffer)))
        self._buffer = {}
        self._buffer_storages = set()
        self._buffer_bytes = 0

    def close(self) -> list[Path]:
        """Write the last shard, name the shards and write the index; return the files written."""
        if self._closed:
            return list(self._written)
        if self._buffer or not self._shards:
            self._flush()
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
            self._buffer = {}
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


#: How safetensors states the OS error under its SafetensorError.
_OS_ERROR_RE = re.compile(r"os error (\d+)")


def _replace(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as err:
        raise write_error(dst, err) from err


@functools.cache
def _file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process's umask."""
    try:  # Linux states it; os.umask can only read it by setting it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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
