"""The CLI process returns freed native memory to the OS (issue 21, flows/process_memory.py): glibc otherwise
raises its mmap threshold after a large free and keeps later large blocks in the heap once freed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a 16 MB block freed (glibc's threshold rises to it), then 100 blocks of 1 MB touched and freed but the last:
# from the heap they stay resident below the one still held; in their own mappings they go back on free
CHURN = """
import ctypes, os, sys
sys.path.insert(0, {root!r})
if {apply}:
    from flows.process_memory import return_freed_memory
    assert return_freed_memory()
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
print(rss() - before, os.environ.get("MALLOC_MMAP_THRESHOLD_"))
"""


def _retained(apply: bool) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", CHURN.format(root=str(ROOT), apply=apply)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    return int(out[0]), out[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux", reason="glibc on Linux")
def test_freed_large_blocks_go_back_to_the_os_and_children_inherit_the_setting():
    kept, env = _retained(apply=False)
    assert kept > 80 and env == "None"  # glibc's default: 99 freed MB still resident
    kept, env = _retained(apply=True)
    assert kept < 10 and env == "131072"  # each block in its own mapping, unmapped on free; children see it


def test_the_cli_applies_it_before_anything_else():
    src = (ROOT / "flows" / "cli.py").read_text()
    assert src.index("return_freed_memory()") < src.index("out.quiet()")
    out = subprocess.run([sys.executable, "-c", "import os, flows.cli; print(os.environ['MALLOC_MMAP_THRESHOLD_'])"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == "131072"
