"""Decoded splits kept as ``.npy`` files next to the store, keyed by the Lance versions the read joined (dataset
table and each feature view), so later reads are memory-maps instead of a Lance decode plus a copy into padded
arrays. An entry is written chunk by chunk into preallocated memory-maps (``SplitCache.writer``), so writing it
never holds the split in memory either. Any write bumps a version, which makes older entries unreachable for
latest reads; an entry superseded on every part is removed when the next entry is saved (a pinned read of an old
version rebuilds its own)."""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch

from models.heads.base import FeatureBatch


# A split whose arrays are smaller than this stays mapped through a pass (its RSS is bounded by this constant):
# dropping its pages after every batch costs more than the gather (a 102k-row vector split: 0.17 s an epoch
# against 0.05 s; pages come back in large folios, so any batch maps most of a small split again).
RELEASE_ABOVE_BYTES = 64 << 20


def release_pages(maps: list[mmap.mmap]) -> None:
    """Drop these mappings' pages from the process (``MADV_DONTNEED``): they stay in the OS page cache, and a
    later read maps them back without touching the disk. A pass over a memory-mapped split otherwise leaves every
    page it read resident in the process, and its RSS grows with the split (issue 21). The arrays are mapped
    copy-on-write and never written, so no private page is lost."""
    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)


def _maps(arrays) -> list[mmap.mmap]:
    """The mappings behind ``np.load(..., mmap_mode=...)`` arrays (none where the OS has no MADV_DONTNEED, or
    for an empty array, which numpy does not map)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return []
    return [a._mmap for a in arrays if isinstance(getattr(a, "_mmap", None), mmap.mmap)]


class SplitCache:
    """``<root>/<part><version>-.../<split>-<inputs>/`` holding ``ids.json`` and one ``.npy`` per tensor."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(versions: dict[str, int]) -> str:
        return "-".join(f"{k}{int(v)}" for k, v in sorted(versions.items()))

    @staticmethod
    def parse(name: str) -> dict[str, int] | None:
        m = re.findall(r"([A-Za-z_]+?)(\d+)(?:-|$)", name)
        return {k: int(v) for k, v in m} if m and SplitCache.key({k: int(v) for k, v in m}) == name else None

    def _dir(self, versions: dict[str, int], split: str, inputs: tuple[str, ...]) -> Path:
        return self.root / self.key(versions) / f"{split}-{'-'.join(sorted(inputs))}"

    def load(self, versions: dict[str, int], split: str, inputs: tuple[str, ...]
             ) -> tuple[list[str], FeatureBatch, Callable[[], None] | None] | None:
        """The cached split as copy-on-write memory-mapped tensors, with the function that drops their resident
        pages (``release_pages``; None for a split under ``RELEASE_ABOVE_BYTES``), or None (absent, or damaged
        and dropped)."""
        d = self._dir(versions, split, inputs)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            arrays = {name: np.load(d / f"{name}.npy", mmap_mode="c") for name in manifest["arrays"]}
            mapped = {name: torch.from_numpy(a) for name, a in arrays.items()}
            ids = json.loads((d / "ids.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):  # damaged: entries appear whole (rename), so drop and rebuild
            shutil.rmtree(d, ignore_errors=True)
            return None
        big = sum(a.nbytes for a in arrays.values()) > RELEASE_ABOVE_BYTES
        return ids, FeatureBatch.from_tensors(mapped), partial(release_pages, _maps(arrays.values())) if big else None

    @contextmanager
    def writer(self, versions: dict[str, int], split: str, inputs: tuple[str, ...]) -> Iterator["EntryWriter"]:
        """A new entry: the caller fills the writer's memory-maps (``EntryWriter.new``) and sets its ``ids``. On a
        clean exit the entry appears whole (temp folder + rename; a concurrent writer of the same entry simply
        loses); on an error nothing of it is left."""
        tmp = self._dir(versions, split, inputs).parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        out = EntryWriter(tmp)
        try:
            yield out
            for a in out.arrays.values():
                a.flush()
            (tmp / "ids.json").write_text(json.dumps(out.ids))
            (tmp / "manifest.json").write_text(json.dumps({"arrays": list(out.arrays), "versions": versions}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            out.arrays.clear()  # (the maps close once the caller drops them too)
        try:
            os.rename(tmp, self._dir(versions, split, inputs))
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune(keep=versions)

    def prune(self, keep: dict[str, int]) -> None:
        """Drop entries superseded by ``keep`` on every part (open memory-maps of them stay valid until closed)."""
        for d in self.root.iterdir() if self.root.exists() else ():
            old = self.parse(d.name) if d.is_dir() else None
            if old and old != keep and old.keys() == keep.keys() and all(old[k] <= keep[k] for k in keep):
                shutil.rmtree(d, ignore_errors=True)


class SplitArrays:
    """Where a split is decoded: zeroed arrays by flat FeatureBatch name (``new``), here in memory."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.ids: list[str] = []

    def new(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        self.arrays[name] = a = self._allocate(name, tuple(shape), np.dtype(dtype))
        return a

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def batch(self) -> FeatureBatch:
        return FeatureBatch.from_tensors({name: torch.from_numpy(a) for name, a in self.arrays.items()})


class EntryWriter(SplitArrays):
    """A cache entry being written: each array a preallocated ``.npy`` memory-map (zeros until filled) in the
    entry's temporary folder."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        path = self.folder / f"{name}.npy"
        a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        with open(path, "r+b") as f:  # the blocks reserved now: a full disk is an OSError here, never a SIGBUS later
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return a
