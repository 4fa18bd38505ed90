"""Decoded splits kept as ``.npy`` files next to the Lance table, keyed by table version, so later reads are
memory-maps instead of a Lance decode plus a copy into padded arrays. Any write to the table bumps its
version, which makes older entries unreachable; they are removed when the next entry is saved."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from models.heads.base import FeatureBatch


class SplitCache:
    """``<root>/v<version>/<split>-<inputs>/`` holding ``ids.json`` and one ``.npy`` per tensor."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, version: int, split: str, inputs: tuple[str, ...]) -> Path:
        return self.root / f"v{version}" / f"{split}-{'-'.join(sorted(inputs))}"

    def load(self, version: int, split: str, inputs: tuple[str, ...]) -> tuple[list[str], FeatureBatch] | None:
        """The cached split as copy-on-write memory-mapped tensors, or None (absent, or damaged and dropped)."""
        d = self._dir(version, split, inputs)
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

    def save(self, version: int, split: str, inputs: tuple[str, ...], ids: list[str], batch: FeatureBatch) -> None:
        """Write atomically (temp folder + rename); a concurrent writer of the same entry simply loses."""
        final = self._dir(version, split, inputs)
        if final.exists():
            return
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        arrays = batch.tensors()
        for name, t in arrays.items():
            np.save(tmp / f"{name}.npy", t.numpy())
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "manifest.json").write_text(json.dumps({"arrays": list(arrays), "version": version}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune(keep=version)

    def prune(self, keep: int) -> None:
        """Drop entries of older table versions (open memory-maps of them stay valid until closed)."""
        for d in self.root.glob("v*"):
            if d.is_dir() and d.name[1:].isdigit() and int(d.name[1:]) < keep:
                shutil.rmtree(d, ignore_errors=True)
