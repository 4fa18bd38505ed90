"""An extraction hands the C heap's free pages back to the OS between its phases (issue 21,
stores/extraction/heap.py): glibc raises its mmap threshold after a large free and keeps later large blocks in the
heap once freed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a 16 MB block freed (glibc's threshold rises to it), then 100 blocks of 1 MB touched and freed but the last:
# they stay resident in the heap below the one still held until the heap is trimmed
CHURN = """
import ctypes, sys
sys.path.insert(0, {root!r})
from stores.extraction.heap import trim
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
before = rss()
blocks = [libc.malloc(1 << 20) for _ in range(100)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
for b in blocks[:-1]:
    libc.free(b)
kept = rss() - before
print(kept, trim(), rss() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc on Linux")
def test_trim_returns_the_freed_heap_pages_to_the_os():
    out = subprocess.run([sys.executable, "-c", CHURN.format(root=str(ROOT))], capture_output=True, text=True,
                         check=True).stdout.split()
    kept, trimmed, after = int(out[0]), out[1], int(out[2])
    assert kept > 80  # glibc's default: 99 freed MB still resident
    assert trimmed == "True" and after < 10


def test_extraction_trims_after_each_phase_and_every_few_commits(tmp_path, tiny_hf, monkeypatch):
    """A real extraction of 36 rows in commits of 4: a trim after hashing, every TRIM_EVERY commits, before
    compaction, after each of the 4 tables' compaction, after the index, and after each table's version pruning."""
    from conftest import make_manifest, manifest_config
    from stores.extraction import local

    calls = []
    monkeypatch.setattr(local, "trim", lambda: calls.append(1) or True)
    monkeypatch.setattr(local, "TRIM_EVERY", 3)
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", bad=False), data__name="trim",
                          store__write_every=4,
                          encoders__image={"kind": "hf", "model": str(tiny_hf["image"]), "image_size": 32},
                          encoders__text={"kind": "hf", "model": str(tiny_hf["text"])})
    report = local.extract(cfg, progress=False)
    assert report.rows == 36
    assert len(calls) == 1 + 36 // 4 // 3 + 1 + 4 + 1 + 4
