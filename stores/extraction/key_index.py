"""Which content keys a feature view holds, and at which Lance row: 16 bytes a key (an 8-byte digest of the key,
sorted, beside its row id) instead of a dict of strings, so an extraction's memory grows by megabytes, not by
the gigabytes a dict of a million keys costs. Own structure rather than a Lance scalar index: the keys written
by this run are not in a Lance index until it is rebuilt, and every chunk asks about them."""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
from stores.features.feature_store import scan_batches
from stores.features.views import StoreError

PLANNED = -1  # a key this run will write (or just wrote) whose row id is not known yet
UNKNOWN = -2  # a key the view does not hold
MERGE_EVERY = 65_536  # recent keys kept in a dict before they are merged into the sorted arrays


def digest(keys: Iterable[str]) -> np.ndarray:
    """An 8-byte blake2b digest of each key (keys are hex digests already, plus ``absent``)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
                        for k in keys), np.uint64)


class KeyIndex:
    """Membership and row ids of one view's keys: sorted (digest, row id) arrays read from the view once, plus
    the keys this run planned and wrote (a dict merged into the arrays every ``MERGE_EVERY`` keys)."""

    def __init__(self, digests: np.ndarray, rowids: np.ndarray):
        order = np.argsort(digests, kind="stable")
        self._d, self._r = digests[order], rowids[order].astype(np.int64)
        self._recent: dict[int, int] = {}

    @classmethod
    def of_table(cls, tbl, batch_rows: int = 65_536) -> "KeyIndex":
        """Every key of a view's Lance table (read as a stream of (key, row id) batches)."""
        digests, rowids = [], []
        for batch in scan_batches(tbl, ["key"], row_id=True, batch_rows=batch_rows):
            digests.append(digest(batch["key"].to_pylist()))
            rowids.append(batch["_rowid"].to_numpy().astype(np.int64))
        return cls(np.concatenate(digests) if digests else np.empty(0, np.uint64),
                   np.concatenate(rowids) if rowids else np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self._d) + len(self._recent)

    def rowids(self, keys: list[str]) -> np.ndarray:
        """Each key's row id; ``PLANNED`` for a key planned but not yet located, ``UNKNOWN`` for a key not there."""
        d = digest(keys)
        out = np.full(len(d), UNKNOWN, np.int64)
        if len(self._d):
            pos = np.searchsorted(self._d, d).clip(max=len(self._d) - 1)
            hit = self._d[pos] == d
            out[hit] = self._r[pos[hit]]
        if self._recent:
            for i in np.flatnonzero(out == UNKNOWN):
                out[i] = self._recent.get(int(d[i]), UNKNOWN)
        return out

    def contains(self, keys: list[str]) -> np.ndarray:
        return self.rowids(keys) != UNKNOWN

    def plan(self, keys: list[str]) -> None:
        """Keys this run is about to write: known from now on, their rows located by ``located``."""
        for h in digest(keys).tolist():
            self._recent.setdefault(h, PLANNED)

    def located(self, keys: list[str], rowids: np.ndarray) -> None:
        for h, r in zip(digest(keys).tolist(), np.asarray(rowids, np.int64).tolist()):
            self._recent[h] = r
        if len(self._recent) >= MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        done = {h: r for h, r in self._recent.items() if r != PLANNED}
        planned = {h: r for h, r in self._recent.items() if r == PLANNED}
        self.__init__(np.concatenate([self._d, np.fromiter(done, np.uint64, len(done))]),
                      np.concatenate([self._r, np.fromiter(done.values(), np.int64, len(done))]))
        self._recent = planned


def appended_rowids(tbl, keys: list[str]) -> np.ndarray:
    """The Lance row ids of the ``keys`` just appended to ``tbl`` (its last rows, in order; the writer lock keeps
    other writers out), checked against the keys read back."""
    n = tbl.count_rows()
    t = tbl.take_offsets(list(range(n - len(keys), n))).select(["key"]).with_row_id().to_arrow()
    if t["key"].to_pylist() != keys:
        raise StoreError(f"feature view {tbl.name}: the rows just written are not its last rows (another writer?); "
                         "a rerun resumes")
    return t["_rowid"].to_numpy().astype(np.int64)
