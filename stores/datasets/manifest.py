"""Users' own data: a CSV / JSONL / Parquet manifest with id, split, label and one column per modality."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from models.config import DataConfig

from .base import Dataset, DatasetError, Record, limit_records, require_file

MODALITY_COLUMNS = ("image", "text", "audio")


def _text_of(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(f"manifest {path} line {line} is not UTF-8 ({e.reason} at byte {e.start}); "
                           "re-save it as UTF-8") from None


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(_text_of(path), newline="")))
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(_text_of(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"manifest {path} line {n} is not valid JSON: {e.msg}") from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise DatasetError(f"manifest {path} must be .csv, .jsonl or .parquet")


def manifest(cfg: DataConfig) -> Dataset:
    """CSV/JSONL/Parquet with columns id, split (train/val/test), label ('a|b' or a list for multi-label) and any
    of image/audio (paths, relative to the manifest) and text. Empty cells mean the modality is missing."""
    if cfg.manifest is None:
        raise DatasetError("dataset=manifest needs data.manifest (a .csv, .jsonl or .parquet path)")
    path = require_file(Path(cfg.manifest), "manifest")
    rows = _read_table(path)
    if not rows:
        raise DatasetError(f"manifest {path} is empty")
    missing = {"id", "split", "label"} - set(rows[0])
    if missing:
        raise DatasetError(f"manifest {path} lacks columns {sorted(missing)}")
    mods = [m for m in MODALITY_COLUMNS if m in rows[0]]
    as_list = lambda v: v if isinstance(v, list) else [s for s in str(v).split("|") if s]  # noqa: E731
    multilabel = any(isinstance(r["label"], list) or "|" in str(r["label"]) for r in rows)
    labels = [[] if r["label"] in (None, "") else as_list(r["label"]) if multilabel else [str(r["label"])]
              for r in rows]
    classes = list(cfg.classes) if cfg.classes else sorted({c for ls in labels for c in ls})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for n, r in enumerate(rows):
        if r["split"] not in ("train", "val", "test"):
            raise DatasetError(f"manifest row {n} (id={r['id']}): split {r['split']!r} not in train/val/test")
        if not labels[n]:
            raise DatasetError(f"manifest row {n} (id={r['id']}): empty label")
        if unknown := [c for c in labels[n] if c not in index]:
            raise DatasetError(f"manifest row {n} (id={r['id']}): label {unknown[0]!r} is not in data.classes "
                               f"{classes[:10]}{' ...' if len(classes) > 10 else ''}")
        payload = {}
        for m in mods:
            v = r.get(m)
            payload[m] = None if v in (None, "") else (v if m == "text" else str((path.parent / str(v)).resolve()))
        label = [index[c] for c in labels[n]] if multilabel else index[labels[n][0]]
        records.append(Record(str(r["id"]), r["split"], label, payload))
    return Dataset(path.stem, mods, classes, limit_records(records, cfg), task="multilabel" if multilabel else
                   ("binary" if len(classes) == 2 else "multiclass"))


# ---------------------------------------------------------------- documented release layouts
