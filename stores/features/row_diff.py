"""Row comparisons between a table's new rows and its current ones (keyed by ``id``), through per-row digests:
which rows changed, which ids are gone, which ids repeat. A table is kept as ids plus 8-byte digests, so comparing
a million rows holds neither table nor a Python object per row."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def duplicate_ids(ids: pa.ChunkedArray | pa.Array) -> list[str]:
    counts = pc.value_counts(ids)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()


def _comparable(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A column as text (lists of labels joined with ``|``), nulls kept."""
    if pa.types.is_list(col.type):
        return pc.binary_join(pc.cast(col, pa.list_(pa.string())), "|")
    return pc.cast(col, pa.string())


def row_digests(rows: pa.Table | pa.RecordBatch, columns: list[str]) -> np.ndarray:
    """A 64-bit digest of each row's ``columns``: each value hashed as ``IdIndex`` hashes ids (salted per process:
    digests compare within one process only; a null hashes as ``None``), the columns' hashes combined FNV-style.
    Rows with equal values get equal digests; unequal ones differ but for a 2^-64 chance. A column at a time,
    never a joined copy of the row (a ``source`` cell can hold a whole text)."""
    out = np.full(rows.num_rows, 0xCBF29CE484222325, np.uint64)
    with np.errstate(over="ignore"):
        for c in columns:
            out = (out ^ IdIndex.hashes(_comparable(rows[c])).view(np.uint64)) * np.uint64(0x100000001B3)
    return out.view(np.int64)


class IdIndex:
    """Where each id sits in a fixed id column, for many batches of lookups: the column's ids hashed and sorted
    once (16 bytes an id), each lookup a binary search checked against the ids themselves.

    Own structure because Arrow keeps no reusable hash table: ``pc.index_in(batch, value_set=column)`` gives the
    same answer but hashes the whole column on every call, O(N) a batch, so a pass over N source rows in batches
    of B cost O(N^2 / B) (1M ids in 350-row batches: 636 s a pass; ``python bench/id_lookup.py``)."""

    CHUNK = 65_536  # ids turned into Python strings at a time (to hash them)

    def __init__(self, ids: pa.ChunkedArray | pa.Array):
        self._ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        h = self.hashes(self._ids)
        self._order = np.argsort(h, kind="stable")  # equal hashes keep column order: the first occurrence wins
        self._h = h[self._order]

    @staticmethod
    def _hash(s: str) -> int:
        return hash(s)  # 64-bit, salted per process: enough for an index that lives in one process

    @classmethod
    def hashes(cls, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each value's 64-bit hash (nulls hash as ``None``)."""
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        out = np.empty(len(ids), np.int64)
        for start in range(0, len(ids), cls.CHUNK):
            part = ids.slice(start, cls.CHUNK).to_pylist()
            out[start:start + len(part)] = np.fromiter(map(cls._hash, part), np.int64, len(part))
        return out

    def index_in(self, query: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The position in the column of each of ``query`` (its first occurrence), null where absent: what
        ``pc.index_in(query, value_set=column)`` returns."""
        query = query.combine_chunks() if isinstance(query, pa.ChunkedArray) else query
        h = self.hashes(query)
        lo = np.searchsorted(self._h, h, "left")
        pos = np.full(len(h), -1, np.int64)
        hit = lo < len(self._h)
        hit[hit] = self._h[lo[hit]] == h[hit]
        pos[hit] = self._order[lo[hit]]
        if hit.any():
            same = pc.fill_null(pc.equal(self._ids.take(pa.array(pos[hit])), query.filter(pa.array(hit))), False)
            for i in np.flatnonzero(hit)[~same.to_numpy(zero_copy_only=False)]:  # another id, same hash (or null)
                pos[i] = self._scan(query[i].as_py(), int(lo[i]))
        return pa.array(pos, mask=pos < 0)

    def _scan(self, value: str, lo: int) -> int:
        """``value``'s first position among the ids whose hash equals the one at sorted position ``lo`` (a hash
        collision: about N^2 / 2^65 pairs), -1 if none is ``value``."""
        end = int(np.searchsorted(self._h, self._h[lo], "right"))
        return next((int(p) for p in self._order[lo:end] if self._ids[int(p)].as_py() == value), -1)


def diff_rows(state: "RowDigests | None", rows: pa.Table | pa.RecordBatch,
              name: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """Each of ``rows``' position among ``state``'s ids (-1: an id new to it, noted as seen otherwise) and
    whether its ``name`` columns differ there. With no state (no table yet, or an empty one) every row is new."""
    if state is None or not len(state):
        return np.full(rows.num_rows, -1, np.int64), np.ones(rows.num_rows, bool)
    pos = state.match(rows)
    return pos, state.differs(rows, pos, name)


class RowDigests:
    """A table's rows reduced to what a diff with new rows needs, read from a stream of its batches: where each
    id is (an ``IdIndex``), named 64-bit digests of column groups (``row_digests``), the Lance row id when the
    batches carry ``_rowid``, and which ids the new rows mentioned. About 40 bytes a row plus the ids, where the
    table itself (texts, keys, JSON) runs to hundreds: a diff of a million rows never holds either table whole."""

    def __init__(self, batches: Iterable[pa.RecordBatch], digests: dict[str, list[str]]):
        ids, parts, rowids = [], {name: [] for name in digests}, []
        for b in batches:
            ids.append(b["id"])
            for name, cols in digests.items():
                parts[name].append(row_digests(b, cols))
            if "_rowid" in b.schema.names:
                rowids.append(b["_rowid"].to_numpy().astype(np.int64))
        self.ids = pa.chunked_array(ids, pa.string()).combine_chunks()
        self.index = IdIndex(self.ids)
        self.digests = {name: np.concatenate(p) if p else np.empty(0, np.int64) for name, p in parts.items()}
        self.columns = digests
        self.rowids = np.concatenate(rowids) if rowids else None
        self.seen = np.zeros(len(self.ids), bool)

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, rows: pa.Table | pa.RecordBatch) -> np.ndarray:
        """Each of ``rows``' position among this table's ids (-1: an id new to it), noted as seen."""
        pos = pc.fill_null(self.index.index_in(rows["id"]), -1).to_numpy()
        self.seen[pos[pos >= 0]] = True
        return pos

    def differs(self, rows: pa.Table | pa.RecordBatch, pos: np.ndarray, name: str) -> np.ndarray:
        """Per row, whether its ``name`` columns differ from the row with its id (a new id differs)."""
        mine = row_digests(rows, self.columns[name])
        return (pos < 0) | (mine != self.digests[name][np.maximum(pos, 0)])

    def unseen_ids(self) -> list[str]:
        """The ids no ``match`` mentioned (rows gone from the source)."""
        return self.ids.filter(pa.array(~self.seen)).to_pylist()
