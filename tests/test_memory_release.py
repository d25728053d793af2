"""The streaming stages' glibc settings: the mmap threshold is fixed and free heap pages are
given back (measured with /proc/self/smaps_rollup, on Linux with glibc only); the console
script asks torch for huge pages before importing it."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mposurgeon.memory import (
    TORCH_HUGE_PAGES,
    _libc,
    bound_heap_growth,
    release_free_memory,
)

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


def _python_lines(script: str, **env: str) -> list[str]:
    """The lines `script` prints in a fresh interpreter, with `TORCH_HUGE_PAGES` unset unless
    given in `env`."""
    base = {k: v for k, v in os.environ.items() if k != TORCH_HUGE_PAGES}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=base | env, capture_output=True, text=True, check=True
    )
    return proc.stdout.splitlines()


def test_huge_pages_are_asked_for_before_torch_is_imported_only() -> None:
    script = (
        "import os\n"
        "from mposurgeon.memory import TORCH_HUGE_PAGES, use_huge_pages_for_tensors\n"
        "print(use_huge_pages_for_tensors(), os.environ.get(TORCH_HUGE_PAGES))\n"
        "import torch\n"
        "print(use_huge_pages_for_tensors())\n"  # after the import: too late
    )
    assert _python_lines(script) == ["True 1", "False"]
    assert _python_lines(script, **{TORCH_HUGE_PAGES: "0"}) == ["True 0", "False"]  # the user's


def test_console_script_asks_for_huge_pages_before_importing_torch() -> None:
    script = (
        "import os, sys\n"
        "sys.argv = ['mposurgeon', '--version']\n"
        "from mposurgeon.cli.entry import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(os.environ.get('{TORCH_HUGE_PAGES}'))\n"
    )
    assert _python_lines(script)[-1] == "1"
