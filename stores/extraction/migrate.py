"""Migration of stores written by the old one-table-per-encoder-set layout into feature views, without
re-encoding (``mm store migrate``)."""
from __future__ import annotations

import json

import numpy as np

from models.config import ExperimentConfig
from stores.datasets import load_dataset
from stores.extraction.entities import entity_table
from stores.features.feature_store import FeatureStore, legacy_store_name, store_name
from stores.features.location import StoreLocation
from stores.features.views import StoreError, View, view_name


def migrate_legacy(cfg: ExperimentConfig) -> dict:
    """Copy a store of the old layout (``<dataset>-<hash>`` table + ``.json``) into feature views, keyed by
    each row's current content key, without encoding anything; a following ``extract`` then builds the dataset
    and search tables (and encodes only rows that were not in the old table)."""
    loc = StoreLocation.for_config(cfg.store)
    legacy = legacy_store_name(cfg)
    meta_path = loc.file(f"{legacy}.json")
    if not meta_path.exists():
        raise StoreError(f"no old-layout store {legacy} under {loc}")
    meta = json.loads(meta_path.read_text())
    db = loc.connect()
    old = db.open_table(legacy).to_arrow()
    ph = db.open_table(legacy + "-placeholders").to_arrow()
    ds = load_dataset(cfg.data)
    keys = {r["id"]: r for r in entity_table(ds).to_pylist()}  # (old layouts are demo-sized)
    enc_cfgs = cfg.encoder_configs()
    store = FeatureStore.for_config(cfg, ds.modalities)
    copied = {}
    with store.writer_lock(cfg.store.lock_timeout_s):
        for m in meta["modalities"]:
            view = View(db, loc, view_name(m, enc_cfgs[m]))
            p = ph.filter(np.asarray(ph["modality"].to_pylist()) == m).to_pylist()[0]
            placeholder = {"vec": np.asarray(p["vec"], np.float32), "tok": _blob(p["tok"], p["ntok"]),
                           "emb": _blob(p["emb"], p["nemb"])}
            view.create(m, enc_cfgs[m], meta["encoders"][m], placeholder)
            have = set(view.row_ids())
            items = {}
            for r in old.select(["id", "issues", f"{m}_present", f"{m}_vec", f"{m}_tok", f"{m}_ntok", f"{m}_emb",
                                 f"{m}_nemb"]).to_pylist():
                key = keys.get(r["id"], {}).get(f"{m}_key")
                if key is None or key in have or key in items:
                    continue
                reason = json.loads(r["issues"]).get(m) if r["issues"] else None
                items[key] = {"present": bool(r[f"{m}_present"]), "reason": reason,
                              "vec": np.asarray(r[f"{m}_vec"], np.float32), "tok": _blob(r[f"{m}_tok"], r[f"{m}_ntok"]),
                              "emb": _blob(r[f"{m}_emb"], r[f"{m}_nemb"])}
            rows = list(items.items())
            for start in range(0, len(rows), max(cfg.store.write_every, 1024)):
                view.add(rows[start : start + max(cfg.store.write_every, 1024)])
            copied[m] = len(rows)
    return {"from": legacy, "to": store_name(cfg), "copied": copied}


def _blob(data: bytes | None, n: int | None) -> np.ndarray | None:
    if data is None or not n:
        return None
    return np.frombuffer(data, np.float16).reshape(n, -1)

