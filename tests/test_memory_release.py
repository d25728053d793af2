"""The streaming stages' glibc settings: the mmap threshold is fixed and free heap pages are
given back (measured with /proc/self/smaps_rollup, on Linux with glibc only)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from mposurgeon.memory import _libc, bound_heap_growth, release_free_memory

GLIBC = _libc() is not None and hasattr(_libc(), "malloc_trim")


def _anonymous_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line")


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_heap_blocks_are_given_back() -> None:
    """4000 blocks of 64 KiB (heap, not mapped), all but the last freed: without a trim the
    heap keeps them (the last block pins the top); with it their pages go back."""
    libc = _libc()
    assert libc is not None
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(4000)]
    for ptr in blocks:
        ctypes.memset(ptr, 1, 64 << 10)  # touched: resident, private
    for ptr in blocks[:-1]:
        libc.free(ptr)
    held = _anonymous_kb()
    release_free_memory()
    given_back = held - _anonymous_kb()
    libc.free(blocks[-1])
    assert given_back > 100 << 10  # most of the 250 MB, in kB


def test_release_and_bound_are_safe_to_call_twice() -> None:
    bound_heap_growth()
    bound_heap_growth()
    release_free_memory()
    release_free_memory()
