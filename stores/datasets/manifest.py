"""Users' own data: a manifest (CSV / JSONL / Parquet with id, split, label and one column per modality) or
shards of one (``sources.py``: folders, globs, buckets, WebDataset, Hugging Face folders) as a ``Dataset``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models.config import DataConfig

from .base import Dataset, DatasetError, Record, Unusable, limit_records
from .labels import check_label_kinds
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
    (paths relative to the manifest, bytes, or {bytes, path}) and text. Empty cells mean the modality is missing."""
    source = Source(cfg)
    mods = source.modalities
    roots = data_roots(source.root, cfg.allowed_roots) if not source.remote else []
    ids: list[str] = []
    splits: list[str] = []
    labels: list[list[str]] = []
    payloads: list[dict[str, Any]] = []
    multilabel = False
    for batch in source.batches():  # the lead's streaming extraction will consume these batches directly
        multilabel |= is_multilabel(batch)
        ids += batch["id"].to_pylist()
        splits += batch["split"].to_pylist()
        labels += batch["label"].to_pylist()
        cells = {m: batch[m].to_pylist() for m in mods}
        payloads += [{m: cells[m][i] if m == "text" else file_ref(cells[m][i], roots) for m in mods}
                     for i in range(batch.num_rows)]
    if not ids:
        raise DatasetError(f"manifest {source.url} is empty")
    if not cfg.classes:
        check_label_kinds(labels, ids, source.url)
    classes = list(cfg.classes) if cfg.classes else sorted({c for ls in labels for c in ls})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for n, (rid, split, names, payload) in enumerate(zip(ids, splits, labels, payloads)):
        if unknown := [c for c in names if c not in index]:
            raise DatasetError(f"manifest row {n} (id={rid}): label {unknown[0]!r} is not in data.classes "
                               f"{classes[:10]}{' ...' if len(classes) > 10 else ''}")
        label = [index[c] for c in names] if multilabel else index[names[0]]
        records.append(Record(rid, split, label, payload))
    return Dataset(cfg.source_name, mods, classes, limit_records(records, cfg), task="multilabel" if multilabel else
                   ("binary" if len(classes) == 2 else "multiclass"))


# ---------------------------------------------------------------- documented release layouts
