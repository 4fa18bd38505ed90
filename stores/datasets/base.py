"""The one manifest schema every dataset becomes (id, split, label, per-modality payload or None), and the
helpers the adapters share (stratified splits, limits, required files)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Callable, Iterator

import numpy as np

from models.config import DataConfig

# the datasets folder when neither data.data_dir nor $MM_DATASETS_DIR says: ../shared/datasets beside the checkout
DEFAULT_DATASETS_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def datasets_root(cfg: DataConfig) -> Path:
    """``data.data_dir``, else ``$MM_DATASETS_DIR``, else ``DEFAULT_DATASETS_DIR``."""
    return Path(cfg.data_dir or os.environ.get("MM_DATASETS_DIR") or DEFAULT_DATASETS_DIR)


class DatasetError(ValueError):
    """A dataset cannot be read as configured (missing files, bad manifest, bad labels)."""


@dataclass(frozen=True)
class Unusable:
    """An input a dataset adapter already knows it must not read (e.g. a path outside the data roots): stored
    as missing with ``reason``, never opened."""

    reason: str

    def __str__(self) -> str:
        return f"unusable: {self.reason}"


def describe_ref(v: Any) -> str | None:
    """A payload reference as short text (the store's ``source`` column, the dataset version): inline bytes by
    their size and digest, not their contents."""
    if v is None:
        return None
    if isinstance(v, bytes):
        return f"<{len(v)} bytes blake2b:{hashlib.blake2b(v, digest_size=8).hexdigest()}>"
    return str(v)


@dataclass
class Record:
    id: str
    split: str
    label: int | list[int]
    payload: dict[str, Any]  # modality -> file path / text / in-memory reference, or None when absent
    attrs: dict[str, str | None] = field(default_factory=dict)  # data.attributes: column -> value as text


class StreamedRecords(Sequence):
    """A source's records read again from it on each pass (``batches``), never all held: iterating streams; ``len``
    is known from the first pass; indexing reads the whole source into a list once (small sources, tests)."""

    def __init__(self, batches: Callable[[], Iterator[list[Record]]], n: int):
        self.batches, self._n, self._all = batches, n, None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Record]:
        for batch in self.batches():
            yield from batch

    def __getitem__(self, i):
        if self._all is None:
            self._all = list(self)
        return self._all[i]


BATCH_RECORDS = 1024


def groups(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last may be shorter): ``itertools.batched`` once the project requires
    Python 3.12 (it supports 3.11)."""
    it = iter(items)
    while group := list(islice(it, size)):
        yield group


@dataclass
class Dataset:
    name: str
    modalities: list[str]
    classes: list[str]
    records: Sequence[Record]  # a list, or StreamedRecords for a source read batch by batch
    task: str = "multiclass"
    resolvers: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # modality -> ref -> raw input
    # a local sharded source's shards as [path, size, mtime_ns] (``Source.listing``): an extraction that read no
    # input from its own file records it, so a rerun on unchanged shards can skip (stores/extraction/freshness.py)
    listing: Callable[[], list[list]] | None = None

    def batches(self) -> Iterator[list[Record]]:
        """The records in source order, a batch at a time (a streamed source holds only one batch)."""
        if isinstance(self.records, StreamedRecords):
            yield from self.records.batches()
            return
        yield from groups(self.records, BATCH_RECORDS)

    def raw(self, modality: str, ref: Any) -> Any:
        """The raw input behind a payload reference (a path unless the adapter resolves it itself)."""
        return self.resolvers[modality](ref) if modality in self.resolvers else ref

    @property
    def version(self) -> str:
        """Content hash of the manifest: ids, splits, labels, payload refs and referenced file sizes."""
        h = hashlib.sha256(f"{self.name}|{self.task}|{self.classes}|{self.modalities}".encode())
        for r in self.records:
            sizes = {m: Path(v).stat().st_size for m, v in r.payload.items()
                     if isinstance(v, str) and m != "text" and Path(v).is_file()}
            h.update(json.dumps([r.id, r.split, r.label, {m: describe_ref(v) for m, v in r.payload.items()}, sizes],
                                sort_keys=True).encode())
        return h.hexdigest()[:16]


def split_stratified(keys: list[Any], labels: list[Any], val: float, test: float, seed: int) -> dict[Any, str]:
    rng = np.random.default_rng(seed)
    by_class: dict[Any, list[Any]] = defaultdict(list)
    for k, y in zip(keys, labels):
        by_class[y].append(k)
    out = {}
    for y in sorted(by_class, key=str):
        ks = list(by_class[y])
        rng.shuffle(ks)
        n_test, n_val = int(round(test * len(ks))), int(round(val * len(ks)))
        for i, k in enumerate(ks):
            out[k] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def limit_records(records: list[Record], cfg: DataConfig) -> list[Record]:
    if cfg.limit is None or cfg.limit >= len(records):
        return records
    keep = np.random.default_rng(cfg.seed).permutation(len(records))[: cfg.limit]
    return [records[i] for i in sorted(keep)]


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found at {path} (set data.data_dir or MM_DATASETS_DIR)")
    return path


# ---------------------------------------------------------------- AV-MNIST (FSDD audio + MNIST image)
def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


