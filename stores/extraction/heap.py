"""Hand the C heap's free pages back to the OS between an extraction's phases, so its RSS tracks what it holds.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so later large buffers (Lance's
fragment writes, compaction and index builds, the tokenizers') come from the heap, and once freed stay resident
unless something trims it: 90-110 MB of a 64k-row extraction's peak, growing with the row count (issue 21).
``malloc_trim`` returns them and changes no allocation. A fixed low threshold (``MALLOC_MMAP_THRESHOLD_``) did as
well for memory but made every torch activation an mmap plus page faults: an MMP epoch took 2.8x the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim() -> bool:
    """``malloc_trim(0)``: free pages of every arena go back to the OS (a few ms). False where the C library is
    not glibc (macOS, musl): nothing to do there."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
