"""Giving freed memory back to the operating system between modules.

glibc's malloc keeps freed blocks below its mmap threshold in its heaps for reuse, and raises
that threshold (up to 32 MB) each time a large block is freed, so a stage that works through
many matrices of a few to tens of MB each keeps freed memory it will not need again. The
streaming stages (decompose, truncate, merge) therefore call `bound_heap_growth` once (blocks
of 4 MB and more are then mapped on their own and given back when freed) and
`release_free_memory` (glibc's `malloc_trim(0)`, which also returns free pages inside the
heaps) after each module. Measured on a 3-layer Llama-shaped decompose (bf16, 300 MB shards):
private peak 472 MB with neither, 424 MB with the trim, 358 MB with both
(`python -m benchmarks.bench_memory --layers 3 --stages decompose`). Both are process-wide
glibc settings, harmless to other code, and no-ops where the C library is not glibc.

Each of those freshly mapped blocks is then faulted in page by page: the console script
(`cli/entry.py`) calls `use_huge_pages_for_tensors` before torch is imported, so that PyTorch
backs tensors of 2 MB and more with transparent huge pages (512x fewer faults). Measured on an
8-layer Llama-shaped decompose (bf16, 500 MB shards, 2 cores): 34 s with 18 s of system time
without (`THP_MEM_ALLOC_ENABLE=0 mposurgeon decompose ...`), 30 s with 10 s with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable

#: mallopt's parameter number of the mmap threshold (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
#: Blocks from this size on are mapped on their own (glibc's default starts at 128 KiB and
#: grows to 32 MiB); below it, the heaps' reuse is worth keeping.
MMAP_THRESHOLD = 4 << 20


#: PyTorch reads this environment variable once, at its first CPU allocation: "1" aligns CPU
#: tensors of 2 MB and more to 2 MB and advises the kernel to back them with transparent huge
#: pages (where the kernel's THP mode is `madvise` or `always`).
TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages_for_tensors() -> bool:
    """Ask PyTorch to back large CPU tensors with transparent huge pages, unless the user set
    `TORCH_HUGE_PAGES` themselves. Only possible before torch is imported: returns whether it
    still was (the variable is then set in this process's environment)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(TORCH_HUGE_PAGES, "1")
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else ctypes.CDLL(None)
    except OSError:
        return None


@functools.cache
def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` (once per process; no-op elsewhere)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc); a no-op elsewhere. A few ms."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
