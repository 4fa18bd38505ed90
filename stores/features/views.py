"""Feature views: one Lance table per (modality, encoder), rows keyed by the content hash of the input (the bytes
of the file, the text, the array). Extracting with a new encoder touches only that encoder's view; datasets
sharing inputs share rows; a changed file has a new key and is extracted again."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa

from models.config import EncoderConfig, runtime_fields
from stores.features import filters
from stores.features.location import StoreError, StoreFile, StoreLocation

ABSENT = "absent"  # key of the row holding the encoder's placeholder: every input absent from the source maps to it
VIEW_PREFIX = "view-"


def view_name(modality: str, cfg: EncoderConfig) -> str:
    """Named by what determines the features (the encoder config); the encoder's full fingerprint (weights
    revision) is checked against the view's meta when extracting."""
    body = json.dumps(cfg.model_dump(mode="json", exclude=runtime_fields(EncoderConfig)), sort_keys=True)
    return f"{VIEW_PREFIX}{modality}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"


def content_key(modality: str, raw: Any) -> str:
    """Hash of the input itself: a file's bytes, a text, an array's dtype/shape/bytes. A path that is not a
    readable file hashes as its name (its loader says why, per item), so a later file at that path gets a new key."""
    if modality != "text" and isinstance(raw, (str, Path)) and Path(raw).is_file():
        try:
            with open(raw, "rb") as f:
                return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        except OSError:
            pass
    h = hashlib.blake2b(digest_size=16)
    if isinstance(raw, np.ndarray):
        h.update(f"array|{raw.dtype}|{raw.shape}|".encode())
        h.update(np.ascontiguousarray(raw).tobytes())
    elif isinstance(raw, bytes):
        h.update(b"bytes|")  # the same digest as of the concatenation, without copying the payload
        h.update(raw)
    else:
        h.update(f"{'text' if modality == 'text' else 'path'}|{raw}".encode())
    return h.hexdigest()


def view_schema(vec_dim: int) -> pa.Schema:
    """Tokens are float16 bytes plus a length: a layout that round-trips in every Lance format (nested
    fixed-size lists do not) and decodes zero-copy into padded arrays."""
    return pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("present", pa.bool_()),
                      pa.field("reason", pa.string()), pa.field("vec", pa.list_(pa.float32(), vec_dim)),
                      pa.field("tok", pa.binary()), pa.field("ntok", pa.int32()),
                      pa.field("emb", pa.binary()), pa.field("nemb", pa.int32())])


def fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def tokens(arrays: list[np.ndarray | None]) -> tuple[pa.Array, pa.Array]:
    blobs = [None if a is None else np.ascontiguousarray(a, dtype=np.float16).tobytes() for a in arrays]
    return pa.array(blobs, pa.binary()), pa.array([None if a is None else a.shape[0] for a in arrays], pa.int32())


class View:
    """``<root>/view-<modality>-<hash>`` (Lance) plus ``<name>.json`` (modality, encoder fingerprint, dims)."""

    def __init__(self, db: lancedb.DBConnection, root: "Path | str | StoreLocation", name: str,
                 version: int | None = None):
        self.db, self.location, self.name, self.pinned = db, StoreLocation.of(root), name, version
        self.root = self.location.root
        self.meta_path = self.location.file(f"{name}.json")

    @property
    def exists(self) -> bool:
        return self.meta_path.exists() and self.name in self.db.list_tables().tables

    @property
    def meta(self) -> dict:
        if not self.meta_path.exists():
            raise StoreError(f"feature view {self.name!r} does not exist under {self.root}; run `mm extract`")
        return json.loads(self.meta_path.read_text())

    def table(self, version: int | None = None):
        """The Lance table at ``version`` (default: the pinned version, else the latest)."""
        tbl = self.db.open_table(self.name)
        v = version if version is not None else self.pinned
        if v is not None:
            try:
                tbl.checkout(int(v))
            except Exception as e:  # noqa: BLE001 - Lance raises a bare error for a removed version
                raise StoreError(f"version {v} of feature view {self.name} is not available ({e}); it was removed "
                                 "by `mm store gc`, or never existed") from None
        return tbl

    @property
    def version(self) -> int:
        return self.table().version

    def create(self, modality: str, encoder_cfg: EncoderConfig, fingerprint: dict, placeholder: dict) -> None:
        """Create the table with its placeholder row (key ``absent``); check the encoder of an existing view."""
        if self.exists:
            self.check(fingerprint)
            return
        meta = {"kind": "view", "modality": modality, "encoder": fingerprint,
                "encoder_config": encoder_cfg.model_dump(mode="json", exclude=runtime_fields(EncoderConfig)),
                "vec_dim": int(placeholder["vec"].shape[-1]), "tok_dim": int(placeholder["tok"].shape[-1]),
                "emb_dim": None if placeholder.get("emb") is None else int(placeholder["emb"].shape[-1]),
                "created": now()}
        if self.name not in self.db.list_tables().tables:
            tbl = self.db.create_table(self.name, schema=view_schema(meta["vec_dim"]))
            tbl.add(self.rows(meta["vec_dim"], [(ABSENT, dict(placeholder, present=False,
                                                             reason="absent in source"))]))
        write_json(self.meta_path, meta)

    def check(self, fingerprint: dict) -> None:
        """Refuse an encoder other than the one this view was extracted with."""
        if self.meta["encoder"] != fingerprint:
            raise StoreError(f"feature view {self.name} was extracted with encoder {self.meta['encoder']} but "
                             f"the config now gives {fingerprint} (weights changed); remove the view "
                             "(`mm store gc`) or use another store.root")

    @staticmethod
    def rows(vec_dim: int, items: list[tuple[str, dict]]) -> pa.Table:
        """Arrow rows from (key, features) pairs; features: present, reason, vec, tok, emb."""
        vecs = np.stack([f["vec"] for _, f in items])
        if not np.isfinite(vecs).all():
            bad = [items[i][0] for i in np.flatnonzero(~np.isfinite(vecs).all(1))]
            raise StoreError(f"non-finite vectors for keys {bad[:5]}; nothing from this batch was written")
        cols: dict[str, Any] = {"key": [k for k, _ in items], "present": [f["present"] for _, f in items],
                                "reason": [f.get("reason") for _, f in items], "vec": fixed(vecs)}
        cols["tok"], cols["ntok"] = tokens([f["tok"] for _, f in items])
        cols["emb"], cols["nemb"] = tokens([f.get("emb") for _, f in items])
        return pa.table(cols, schema=view_schema(vec_dim))

    def add(self, items: list[tuple[str, dict]]) -> int:
        """Append rows (one atomic Lance commit); returns the new version."""
        tbl = self.db.open_table(self.name)
        tbl.add(self.rows(self.meta["vec_dim"], items))
        return tbl.version

    def row_ids(self, tbl=None) -> dict[str, int]:
        """key -> Lance row id in ``tbl`` (default: this view's pinned/latest version)."""
        tbl = tbl if tbl is not None else self.table()
        t = tbl.search().select(["key"]).with_row_id(True).limit(max(tbl.count_rows(), 1)).to_arrow()
        return dict(zip(t["key"].to_pylist(), t["_rowid"].to_pylist()))

    def take(self, tbl, row_ids: list[int], columns: list[str]) -> pa.Table:
        """Rows by Lance row id, in row-id order (Lance's, whatever the order given: callers match them by key)."""
        if not row_ids:
            return tbl.search().select(columns).limit(1).to_arrow().slice(0, 0)
        return tbl.take_row_ids(row_ids).select(columns).to_arrow()

    def lengths(self, tbl) -> dict[str, int]:
        """Padded token lengths of this version: the longest sequence stored (deterministic per version)."""
        t = tbl.search().select(["ntok", "nemb"]).limit(max(tbl.count_rows(), 1)).to_arrow()
        out = {"tok": int(pa.compute.max(t["ntok"]).as_py() or 1)}
        if self.meta["emb_dim"] is not None:
            out["emb"] = int(pa.compute.max(t["nemb"]).as_py() or 1)
        return out

    def placeholder(self, tbl) -> pa.Table:
        return tbl.search().where(filters.eq("key", ABSENT)).limit(1).to_arrow()


def write_json(path: StoreFile | Path, obj: dict) -> None:
    """Whole or not at all: StoreFile.write_text (renamed over locally, one PUT on an object store), or a
    local Path written beside and renamed over."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if isinstance(path, Path):
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    else:
        path.write_text(text)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
