"""The dataset table's rows as Arrow, built from a stream of source records, and what an extraction must write
to the search table, found as those rows stream past. Per row, only digests and ids are kept (``RowDigests``);
the rows to write wait in a local spool, never a Python object per row."""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from stores.datasets import Dataset, Record
from stores.datasets.base import describe_ref, groups
from stores.encoders import LOAD_WORKERS
from stores.features.feature_store import FeatureStore, entity_schema
from stores.features.row_diff import RowDigests, diff_rows, row_digests
from stores.features.spool import ArrowSpool
from stores.features.views import ABSENT, content_key

SEARCH_COLUMNS = ("split", "label", "labels", "source")


def _stat(raw: Any) -> str | None:
    """(path, size, mtime) of a file input: an unchanged stat lets a rerun skip re-hashing the file."""
    if isinstance(raw, str) and Path(raw).is_file():
        st = Path(raw).stat()
        return json.dumps([raw, st.st_size, st.st_mtime_ns])
    return None


class KnownInputs:
    """The content keys the dataset table already holds for file inputs whose stat has not changed, so a rerun
    re-hashes no unchanged file. Compares 8-byte stat digests; reads only the keys it reuses back from Lance."""

    def __init__(self, store: FeatureStore, old: RowDigests):
        self.store, self.old = store, old

    def keys(self, ids: list[str], stats: dict[str, list[str | None]]) -> dict[str, list[str | None]]:
        """Per modality with file inputs in this batch, per input: its stored key where the id is known and the
        file's stat unchanged, else None. The batch's ids are matched once for every modality."""
        stats = {m: s for m, s in stats.items() if any(x is not None for x in s)}  # (inline bytes, text: none)
        if not stats:
            return {}
        pos = self.old.match(pa.table({"id": pa.array(ids, pa.string())}))
        out = {}
        for m, s in stats.items():
            col = f"{m}_stat"
            same = (pos >= 0) & np.array([x is not None for x in s], bool)
            same &= row_digests(pa.table({col: pa.array(s, pa.string())}), [col]) == \
                self.old.digests[col][np.maximum(pos, 0)]
            out[m] = [None] * len(ids)
            where = np.flatnonzero(same)
            for i, key in zip(where, self.store.entity_values(self.old.rowids[pos[where]], f"{m}_key")):
                out[m][i] = key
        return out


def map_chunks(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any],
               parts: int = LOAD_WORKERS) -> list[Any]:
    """``[fn(x) for x in items]`` on ``pool``, one task per contiguous chunk (``parts`` of them), not per item: a
    future per row (the pool's ``map``) cost more than the row itself for small inline inputs (py-spy at 128k
    rows: 4-5% of an extraction in ``submit`` and ``Future``)."""
    chunks = groups(items, max(1, -(-len(items) // max(1, parts))))
    return [y for out in pool.map(lambda chunk: [fn(x) for x in chunk], chunks) for y in out]


def entity_batches(ds: Dataset, known: KnownInputs | None, pool: ThreadPoolExecutor,
                   seen: Counter | None = None) -> Iterator[pa.RecordBatch]:
    """The dataset table's rows for each batch of ``ds``'s records: entity columns plus each modality's content
    key, hashed on ``pool`` (hashing frees the GIL) unless ``known`` holds it for an unchanged file. ``seen``
    counts the image/audio inputs that are not inline bytes (``"external"``: a path, or one refused)."""
    schema = entity_schema(ds.modalities)
    for recs in ds.batches():
        raws = {m: [None if r.payload.get(m) is None else ds.raw(m, r.payload[m]) for r in recs] for m in ds.modalities}
        if seen is not None:
            seen["external"] += sum(x is not None and not isinstance(x, bytes)
                                    for m, xs in raws.items() if m != "text" for x in xs)
        stats = {m: map_chunks(pool, _stat, raws[m]) if m != "text" else [None] * len(recs) for m in ds.modalities}
        reuse = known.keys([r.id for r in recs], stats) if known is not None else {}

        def row(i_r: tuple[int, Record]) -> dict:
            i, r = i_r
            out = {"id": r.id, "split": r.split, "label": -1 if isinstance(r.label, list) else r.label,
                   "labels": r.label if isinstance(r.label, list) else [r.label],
                   "source": json.dumps({m: describe_ref(v) for m, v in r.payload.items()
                                         if not isinstance(v, np.ndarray)}),
                   "attrs": json.dumps(r.attrs, sort_keys=True) if r.attrs else None}
            for m in ds.modalities:
                raw = raws[m][i]
                key = ABSENT if r.payload.get(m) is None else (m in reuse and reuse[m][i]) or content_key(m, raw)
                out[f"{m}_key"], out[f"{m}_stat"] = key, stats[m][i]
            return out

        yield pa.RecordBatch.from_pylist(map_chunks(pool, row, list(enumerate(recs))), schema=schema)


def entity_table(ds: Dataset) -> pa.Table:
    """Every row at once (old store layouts, demo-sized: stores/extraction/migrate.py)."""
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        batches = list(entity_batches(ds, None, pool))
    return pa.Table.from_batches(batches, schema=entity_schema(ds.modalities))


def work_schema(modalities: list[str]) -> pa.Schema:
    """The columns of a row to (re)write to the search table, plus whether its id is new to that table."""
    ent = entity_schema(modalities)
    return pa.schema([ent.field(c) for c in ("id", *SEARCH_COLUMNS, *(f"{m}_key" for m in modalities))]
                     + [pa.field("new_in_search", pa.bool_())])


class SearchDiff:
    """The rows an extraction must (re)write to the search table, found as the dataset rows stream past: ids new
    to it, or whose split, labels, source or content keys changed. They are spooled in source order (the order
    the second pass over the source meets them); ``gone`` names the ids the search table holds and the source no
    longer does."""

    def __init__(self, current: RowDigests | None, modalities: list[str], spool: ArrowSpool):
        self.current, self.spool = current, spool
        self.columns = [*SEARCH_COLUMNS, *(f"{m}_key" for m in modalities)]
        self.rows = self.stale = 0

    def tap(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """``batches`` unchanged, each noted on its way past."""
        for b in batches:
            pos, stale = diff_rows(self.current, b)
            keep = pa.array(stale)
            self.spool.add(b.select(["id", *self.columns]).filter(keep)
                           .append_column("new_in_search", pa.array(pos < 0).filter(keep)))
            self.rows += b.num_rows
            self.stale += int(stale.sum())
            yield b

    def gone(self) -> list[str]:
        return self.current.unseen_ids() if self.current is not None else []
