"""Mask table: the presence masks every method sees, saved per (dataset version, split, pattern, seed)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.patterns import MissingPattern, presence_mask
from stores.features import filters
from stores.features.feature_store import FeatureStore, StoreError


class MaskStore:
    """A Lance table ``<dataset>-masks`` with one row per (dataset_version, split, pattern, seed, id); the dataset
    version names the dataset table's Lance version, so a pinned rerun finds its masks again."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.name = store.dataset + "-masks"

    def _schema(self) -> pa.Schema:
        return pa.schema([("dataset_version", pa.string()), ("split", pa.string()), ("pattern", pa.string()),
                          ("pattern_json", pa.string()), ("seed", pa.int32()), ("id", pa.string())]
                         + [(f"{m}_present", pa.bool_()) for m in self.store.modalities])

    def _table(self):
        db = self.store.db
        if self.name not in db.list_tables().tables:
            return db.create_table(self.name, schema=self._schema())
        return db.open_table(self.name)

    def get(self, split: str, ids: list[str], pattern: MissingPattern, seed: int,
            groups: list[str | None] | None = None) -> np.ndarray:
        """[len(ids), M] presence (True = present) in ``ids`` order, created and saved on first use; ``groups``:
        the rows' class names (``by_class``) or column values (``by_column``) for a pattern that depends on them."""
        mods = self.store.modalities
        # the dataset table version plus the ids read: a partly extracted store reads fewer ids at one version
        version = f"{self.store.meta.dataset_version}/{hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:8]}"
        where = filters.all_of(filters.eq("dataset_version", version), filters.eq("split", split),
                               filters.eq("pattern", pattern.key), filters.eq("seed", int(seed)))
        with self.store.location.lock(self.name, 120, hint="masks are being saved by another run"):
            tbl = self._table()
            t = tbl.search().where(where).limit(max(tbl.count_rows(), 1)).to_arrow()
            if t.num_rows:
                pos = pc.index_in(pa.array(ids, pa.string()), value_set=t["id"])  # joined in Arrow, not a dict
                if pos.null_count:
                    missing = pa.array(ids, pa.string()).filter(pos.is_null()).to_pylist()
                    raise StoreError(f"saved masks for {split}/{pattern.key}/seed {seed} lack ids {missing[:5]}")
                cols = np.stack([t[f"{m}_present"].to_numpy(zero_copy_only=False) for m in mods], 1)
                return cols[pos.to_numpy()]
            present = presence_mask(pattern, mods, len(ids), split, seed, groups)
            tbl.add(pa.table({"dataset_version": [version] * len(ids), "split": [split] * len(ids),
                              "pattern": [pattern.key] * len(ids), "pattern_json": [pattern.model_dump_json()] * len(ids),
                              "seed": [seed] * len(ids), "id": ids,
                              **{f"{m}_present": present[:, i] for i, m in enumerate(mods)}}, schema=self._schema()))
            self.store.compact_table(tbl)  # one commit a mask set
            return present

    def table(self, seed: int | None = None) -> pa.Table:
        """The saved masks, optionally only those of one seed (filtered in the Lance query)."""
        tbl = self._table()
        q = tbl.search() if seed is None else tbl.search().where(filters.eq("seed", int(seed)))
        return q.limit(max(tbl.count_rows(), 1)).to_arrow()
