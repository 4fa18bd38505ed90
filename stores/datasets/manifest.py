"""Users' own data: a manifest (CSV / JSONL / Parquet with id, split, label and one column per modality) or
shards of one (``sources.py``: folders, globs, buckets, WebDataset, Hugging Face folders) as a ``Dataset``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.config import DataConfig

from .base import Dataset, DatasetError, Record, StreamedRecords, Unusable
from .labels import NUMBER, check_label_kinds
from .sources import Source, is_multilabel


def data_roots(folder: Path | str, allowed: list[Path]) -> list[Path]:
    """The folders a manifest's file paths may resolve into: its own (the source's root folder) and
    ``data.allowed_roots``."""
    return [Path(os.path.realpath(folder))] + [Path(os.path.realpath(p)) for p in allowed]


def inside(path: Path, roots: list[Path]) -> str | Unusable:
    """``path`` with every symlink resolved, when that lies under one of ``roots``; else an ``Unusable`` the
    extraction stores as missing ("outside the data roots"). ``realpath`` does not raise on a symlink loop:
    the looping path stays a path, and its loader records the item as unreadable."""
    real = Path(os.path.realpath(path))
    if any(real == r or r in real.parents for r in roots):
        return str(real)
    return Unusable(f"outside the data roots: {path} (allowed: the manifest's folder and data.allowed_roots)")


def file_ref(cell: dict[str, Any] | None, roots: list[Path]) -> str | bytes | Unusable | None:
    """An image/audio cell of ``sources``' ``{bytes, path}``: the bytes, else the path (kept inside the data
    roots; a path in a remote shard is stored as missing, the bytes belong in the shard)."""
    v = cell and (cell["bytes"] or cell["path"])
    if not v or isinstance(v, bytes):
        return v or None
    if "://" in v:
        return Unusable(f"a file path in a remote source: {v} (put the file's bytes in the shard)")
    return inside(Path(v), roots)


def manifest(cfg: DataConfig) -> Dataset:
    """Rows with id, split (train/val/test), label ('a|b' or a list for multi-label) and any of image/audio
    (paths relative to the manifest, bytes, or {bytes, path}) and text. Empty cells mean the modality is missing.

    Two passes, neither holding the rows: the first reads only id, split and label (the classes, the row count,
    ``data.limit``'s sample, the checks); the records are then streamed from the source batch by batch, with their
    image/audio bytes, each time a consumer iterates them (``Dataset.batches``)."""
    source = Source(cfg)
    source.check_attributes()
    mods = source.modalities
    roots = data_roots(source.root, cfg.allowed_roots) if not source.remote else []
    ids, labels, multilabel = [], [], False
    for batch in source.batches(payloads=False):
        multilabel |= is_multilabel(batch)
        ids.append(batch["id"])
        labels.append(batch["label"])
    if not ids:
        raise DatasetError(f"manifest {source.url} is empty")
    names = pa.chunked_array(labels, pa.list_(pa.string()))
    distinct = pc.unique(pc.list_flatten(names)).to_pylist()
    if not cfg.classes and len({bool(NUMBER.fullmatch(c)) for c in distinct}) > 1:  # the error path: Python lists
        check_label_kinds(names.to_pylist(), pa.chunked_array(ids).to_pylist(), source.url)
    classes = list(cfg.classes) if cfg.classes else sorted(distinct)
    if unknown := sorted(set(distinct) - set(classes)):
        row = pc.index(_rows_with(names, unknown[0]), True).as_py()
        raise DatasetError(f"manifest row {row} (id={pa.chunked_array(ids)[row].as_py()}): label {unknown[0]!r} is "
                           f"not in data.classes {classes[:10]}{' ...' if len(classes) > 10 else ''}")
    if mods:  # the payload columns' types are checked now, before a store is touched: one batch is read
        next(source.batches(), None)
    n = sum(len(a) for a in ids)
    keep = None
    if cfg.limit is not None and cfg.limit < n:  # the sample limit_records takes, as a mask over the rows
        keep = np.zeros(n, bool)
        keep[np.random.default_rng(cfg.seed).permutation(n)[: cfg.limit]] = True
    index = {c: i for i, c in enumerate(classes)}

    def batches() -> Iterator[list[Record]]:
        offset = 0
        for batch in source.batches():
            rows = range(batch.num_rows) if keep is None else np.flatnonzero(keep[offset : offset + batch.num_rows])
            offset += batch.num_rows
            if not len(rows):
                continue
            cols = {f: batch[f].to_pylist() for f in ("id", "split", "label", *mods, *cfg.attributes)}
            yield [Record(cols["id"][i], cols["split"][i],
                          [index[c] for c in cols["label"][i]] if multilabel else index[cols["label"][i][0]],
                          {m: cols[m][i] if m == "text" else file_ref(cols[m][i], roots) for m in mods},
                          {a: cols[a][i] for a in cfg.attributes})
                   for i in rows]

    return Dataset(cfg.source_name, mods, classes, StreamedRecords(batches, n if keep is None else int(keep.sum())),
                   task="multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass"),
                   listing=None if source.remote else source.listing)


def _rows_with(names: pa.ChunkedArray, label: str) -> pa.Array:
    """Per row, whether its label list holds ``label``."""
    flat = pa.concat_arrays([c for c in names.chunks]) if names.num_chunks else pa.array([], names.type)
    hit = pc.equal(pc.list_flatten(flat), label).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(flat).to_numpy()
    out = np.zeros(len(flat), bool)
    out[parent[hit]] = True
    return pa.array(out)


# ---------------------------------------------------------------- documented release layouts
