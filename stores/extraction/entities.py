"""The dataset table's rows as Arrow, built from a stream of source records, and the Arrow comparisons that say
what an extraction must write: ids new to a table, rows whose columns changed, ids gone from the source. One
compact Arrow table of ids and content keys (about 200 bytes a row), never a Python object per row."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from stores.datasets import Dataset, Record
from stores.datasets.base import describe_ref
from stores.encoders import LOAD_WORKERS
from stores.features.feature_store import entity_schema
from stores.features.row_diff import IdIndex
from stores.features.views import ABSENT, content_key

SEARCH_COLUMNS = ("split", "label", "labels", "source")


def _stat(raw: Any) -> str | None:
    """(path, size, mtime) of a file input: an unchanged stat lets a rerun skip re-hashing the file."""
    if isinstance(raw, str) and Path(raw).is_file():
        st = Path(raw).stat()
        return json.dumps([raw, st.st_size, st.st_mtime_ns])
    return None


def entity_batches(ds: Dataset, old: pa.Table | None, pool: ThreadPoolExecutor) -> Iterator[pa.RecordBatch]:
    """The dataset table's rows for each batch of ``ds``'s records: entity columns plus each modality's content
    key, re-hashed only when a file's stat differs from the one in ``old`` (the table as it is)."""
    schema = entity_schema(ds.modalities)
    where = IdIndex(old["id"]) if old is not None and old.num_rows else None
    for recs in ds.batches():
        prev: dict[str, list] = {}
        if where is not None:
            pos = where.index_in(pa.array([r.id for r in recs], pa.string()))
            for m in ds.modalities:
                prev[m] = list(zip(old[f"{m}_stat"].take(pos).to_pylist(), old[f"{m}_key"].take(pos).to_pylist()))

        def row(i_r: tuple[int, Record]) -> dict:
            i, r = i_r
            out = {"id": r.id, "split": r.split, "label": -1 if isinstance(r.label, list) else r.label,
                   "labels": r.label if isinstance(r.label, list) else [r.label],
                   "source": json.dumps({m: describe_ref(v) for m, v in r.payload.items()
                                         if not isinstance(v, np.ndarray)}),
                   "attrs": json.dumps(r.attrs, sort_keys=True) if r.attrs else None}
            for m in ds.modalities:
                ref = r.payload.get(m)
                raw = None if ref is None else ds.raw(m, ref)
                stat = _stat(raw) if m != "text" else None
                if ref is None:
                    key = ABSENT
                elif stat is not None and m in prev and prev[m][i][0] == stat:
                    key = prev[m][i][1]
                else:
                    key = content_key(m, raw)
                out[f"{m}_key"], out[f"{m}_stat"] = key, stat
            return out

        yield pa.RecordBatch.from_pylist(list(pool.map(row, enumerate(recs))), schema=schema)  # hashing frees the GIL


def entity_table(ds: Dataset, old: pa.Table | None) -> pa.Table:
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        batches = list(entity_batches(ds, old, pool))
    return pa.Table.from_batches(batches, schema=entity_schema(ds.modalities)).combine_chunks()
