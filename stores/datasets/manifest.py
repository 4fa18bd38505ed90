"""Users' own data: a CSV / JSONL / Parquet manifest with id, split, label and one column per modality."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from models.config import DataConfig

from .base import Dataset, DatasetError, Record, Unusable, limit_records, require_file

MODALITY_COLUMNS = ("image", "text", "audio")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


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


def label_name(v: Any) -> str:
    """A label as its class name: numbers and numeric-looking strings written one way (``1``, ``"1"``, ``1.0``
    and ``" 1 "`` are class "1"; pandas writes an int column with gaps as floats), others stripped. Empty for
    a missing label (None, NaN, blank)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    text = str(v).strip()
    if NUMBER.fullmatch(text):
        number = float(text)
        return str(int(number)) if number.is_integer() else repr(number)
    return text


def label_names(v: Any, multilabel: bool) -> list[str]:
    """A label cell's class names: one, or for multi-label a list or ``a|b``; none for a missing label."""
    cells = v if isinstance(v, list) else label_name(v).split("|") if multilabel else [v]
    return [n for c in cells if (n := label_name(c))]


def check_label_kinds(labels: list[list[str]], rows: list[dict], path: Path) -> None:
    """Refuse a label column that mixes numbers and names (``1``, ``2``, ``cat``): one of the two is probably
    a mistake, and a model would silently learn both as classes. ``data.classes`` states such a set on purpose."""
    numeric = [i for i, ls in enumerate(labels) if ls and all(NUMBER.fullmatch(c) for c in ls)]
    is_numeric = set(numeric)
    named = [i for i, ls in enumerate(labels) if ls and i not in is_numeric]
    if numeric and named:
        few = min(numeric, named, key=len)
        kind = "names" if few is named else "numbers"
        shown = ", ".join(f"{i} (id={rows[i]['id']}, label {rows[i]['label']!r})" for i in few[:3])
        raise DatasetError(f"manifest {path} mixes numeric labels and names: {len(few)} rows have {kind}, e.g. "
                           f"rows {shown}; fix them, or list the classes on purpose in data.classes")


def data_roots(manifest_path: Path, allowed: list[Path]) -> list[Path]:
    """The folders a manifest's file paths may resolve into: its own folder and ``data.allowed_roots``."""
    return [Path(os.path.realpath(manifest_path.parent))] + [Path(os.path.realpath(p)) for p in allowed]


def inside(path: Path, roots: list[Path]) -> str | Unusable:
    """``path`` with every symlink resolved, when that lies under one of ``roots``; else an ``Unusable`` the
    extraction stores as missing ("outside the data roots"). ``realpath`` does not raise on a symlink loop:
    the looping path stays a path, and its loader records the item as unreadable."""
    real = Path(os.path.realpath(path))
    if any(real == r or r in real.parents for r in roots):
        return str(real)
    return Unusable(f"outside the data roots: {path} (allowed: the manifest's folder and data.allowed_roots)")


def file_ref(v: Any, path: Path, roots: list[Path], m: str, n: int) -> str | bytes | Unusable | None:
    """An image/audio cell: a path relative to the manifest (kept inside the data roots), the file's bytes
    (a Parquet binary column), or the ``{bytes, path}`` struct Hugging Face ``datasets`` writes."""
    if isinstance(v, dict) and ("bytes" in v or "path" in v):
        v = v.get("bytes") or v.get("path")
        if v is None:
            return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, str):
        return inside(path.parent / v, roots)
    raise DatasetError(f"manifest {path} row {n}: column {m!r} holds {type(v).__name__} values; supported are a "
                       "path relative to the manifest, the file's bytes, or a {bytes, path} struct")


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
    multilabel = any(isinstance(r["label"], list) or "|" in str(r["label"]) for r in rows)
    labels = [label_names(r["label"], multilabel) for r in rows]
    if not cfg.classes:
        check_label_kinds(labels, rows, path)
    classes = list(cfg.classes) if cfg.classes else sorted({c for ls in labels for c in ls})
    roots = data_roots(path, cfg.allowed_roots)
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
        payload = {m: None if r.get(m) in (None, "") else r[m] if m == "text" else file_ref(r[m], path, roots, m, n)
                   for m in mods}
        label = [index[c] for c in labels[n]] if multilabel else index[labels[n][0]]
        records.append(Record(str(r["id"]), r["split"], label, payload))
    return Dataset(path.stem, mods, classes, limit_records(records, cfg), task="multilabel" if multilabel else
                   ("binary" if len(classes) == 2 else "multiclass"))


# ---------------------------------------------------------------- documented release layouts
