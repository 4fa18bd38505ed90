"""Freed native memory goes back to the OS, so a long command's RSS tracks what it holds, not its high-water mark.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after which large
buffers (Lance's fragment and index builds, torch's tensors, the tokenizers') come from the heap, and when freed stay
there as retained pages. In one 64k-row extraction that was 164 MB of the peak RSS, and it grew with the row count
(bench/RESULTS.md, issue 21). A fixed threshold keeps blocks of 128 KB and more in their own mappings, returned on
free; smaller ones, most of Python's, are unaffected. The same setting goes to child processes (Prefect's and
Ray's workers) through ``MALLOC_MMAP_THRESHOLD_``, which glibc reads at start; a value the user exported wins."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Apply the threshold to this process and its future children. False where the C library is not glibc."""
    value = int(os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD)))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, value))
    except (OSError, AttributeError):  # macOS, musl, Windows: their allocators have their own policies
        return False
