"""Decoded splits kept as ``.npy`` files next to the store, keyed by the Lance versions the read joined (dataset
table and each feature view), so later reads are memory-maps instead of a Lance decode plus a copy into padded
arrays. Any write bumps a version, which makes older entries unreachable for latest reads; an entry superseded
on every part is removed when the next entry is saved (a pinned read of an old version rebuilds its own)."""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from models.heads.base import FeatureBatch


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

    def load(self, versions: dict[str, int], split: str, inputs: tuple[str, ...]) -> tuple[list[str], FeatureBatch] | None:
        """The cached split as copy-on-write memory-mapped tensors, or None (absent, or damaged and dropped)."""
        d = self._dir(versions, split, inputs)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            mapped = {name: torch.from_numpy(np.load(d / f"{name}.npy", mmap_mode="c")) for name in manifest["arrays"]}
            ids = json.loads((d / "ids.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):  # damaged: entries appear whole (rename), so drop and rebuild
            shutil.rmtree(d, ignore_errors=True)
            return None
        return ids, FeatureBatch.from_tensors(mapped)

    def save(self, versions: dict[str, int], split: str, inputs: tuple[str, ...], ids: list[str],
             batch: FeatureBatch) -> None:
        """Write atomically (temp folder + rename); a concurrent writer of the same entry simply loses."""
        final = self._dir(versions, split, inputs)
        if final.exists():
            return
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        arrays = batch.tensors()
        for name, t in arrays.items():
            np.save(tmp / f"{name}.npy", t.numpy())
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "manifest.json").write_text(json.dumps({"arrays": list(arrays), "versions": versions}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune(keep=versions)

    def prune(self, keep: dict[str, int]) -> None:
        """Drop entries superseded by ``keep`` on every part (open memory-maps of them stay valid until closed)."""
        for d in self.root.iterdir() if self.root.exists() else ():
            old = self.parse(d.name) if d.is_dir() else None
            if old and old != keep and old.keys() == keep.keys() and all(old[k] <= keep[k] for k in keep):
                shutil.rmtree(d, ignore_errors=True)
