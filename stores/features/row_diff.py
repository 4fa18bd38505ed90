"""Row comparisons in Arrow between a table's new rows and its current ones (keyed by ``id``): which rows
changed, which ids are gone, which ids repeat. Vectorised, so comparing a million rows holds no Python object
per row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def duplicate_ids(ids: pa.ChunkedArray | pa.Array) -> list[str]:
    counts = pc.value_counts(ids)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()


def _comparable(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as a type ``not_equal`` accepts (lists of labels as text)."""
    if pa.types.is_list(col.type):
        return pc.binary_join(pc.cast(col, pa.list_(pa.string())), "|")
    return col


def differs(new: pa.Table, old: pa.Table, columns: list[str]) -> np.ndarray:
    """Per row of ``new``, whether any of ``columns`` differs from ``old``'s row with the same id (a row missing
    from ``old`` differs); nulls compare equal to nulls."""
    pos = pc.index_in(new["id"], value_set=old["id"])
    out = pos.is_null().to_numpy(zero_copy_only=False).copy()
    if out.all():
        return out
    at = old.take(pc.fill_null(pos, 0))
    for c in columns:
        a, b = _comparable(new[c]), _comparable(at[c])
        ne = pc.fill_null(pc.not_equal(a, b), False)
        ne = pc.or_(ne, pc.xor(pc.is_null(a), pc.is_null(b)))
        out |= ne.to_numpy(zero_copy_only=False)
    return out


def absent_from(ids: pa.ChunkedArray | pa.Array, current: pa.ChunkedArray | pa.Array) -> list[str]:
    """The ``ids`` not in ``current`` (rows to remove)."""
    return ids.filter(pc.invert(pc.is_in(ids, value_set=current))).to_pylist() if len(ids) else []


class IdIndex:
    """Where each id sits in a fixed id column, for many batches of lookups: the column's ids hashed and sorted
    once (16 bytes an id), each lookup a binary search checked against the ids themselves.

    Own structure because Arrow keeps no reusable hash table: ``pc.index_in(batch, value_set=column)`` gives the
    same answer but hashes the whole column on every call, O(N) a batch, so a pass over N source rows in batches
    of B cost O(N^2 / B) (1M ids in 350-row batches: 636 s a pass; ``python bench/id_lookup.py``)."""

    CHUNK = 65_536  # ids turned into Python strings at a time (to hash them)

    def __init__(self, ids: pa.ChunkedArray | pa.Array):
        self._ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        h = self._hashes(self._ids)
        self._order = np.argsort(h, kind="stable")  # equal hashes keep column order: the first occurrence wins
        self._h = h[self._order]

    @staticmethod
    def _hash(s: str) -> int:
        return hash(s)  # 64-bit, salted per process: enough for an index that lives in one process

    def _hashes(self, ids: pa.Array) -> np.ndarray:
        out = np.empty(len(ids), np.int64)
        for start in range(0, len(ids), self.CHUNK):
            part = ids.slice(start, self.CHUNK).to_pylist()
            out[start:start + len(part)] = np.fromiter(map(self._hash, part), np.int64, len(part))
        return out

    def index_in(self, query: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The position in the column of each of ``query`` (its first occurrence), null where absent: what
        ``pc.index_in(query, value_set=column)`` returns."""
        query = query.combine_chunks() if isinstance(query, pa.ChunkedArray) else query
        h = self._hashes(query)
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
