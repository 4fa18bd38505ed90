"""Batched, incremental, resumable extraction of frozen-encoder features into the feature store."""
from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from models.config import ExperimentConfig
from .datasets import Dataset, Record, load_dataset
from .encoders import LOAD_WORKERS, BadInput, Encoded, Encoder, build_encoder
from .feature_store import FeatureStore, StoreError, fingerprint, now, store_name


@dataclass
class ExtractReport:
    store: str
    fingerprint: str
    added: int
    skipped: int
    rows: int
    lance_version: int
    missing_counts: dict[str, dict[str, int]]
    seconds: float
    encode_items_per_s: dict[str, float] = field(default_factory=dict)
    indices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _first(enc: Encoded, i: int = 0) -> dict[str, Any]:
    return {"vec": enc.vec[i], "tok": enc.tok[i], "emb": enc.emb[i] if enc.emb is not None else None}


def _encode_modality(encoder: Encoder, dataset: Dataset, modality: str, records: list[Record], batch_size: int,
                     placeholder: dict[str, Any], timing: Counter) -> tuple[list[dict], list[str | None]]:
    """Features per record; a record whose input is absent or unreadable gets the placeholder and a reason.
    Inputs are decoded on a thread pool (image/audio decoding releases the GIL), in record order."""

    def load(r: Record) -> tuple[Any, str | None]:
        ref = r.payload.get(modality)
        try:
            if ref is None:
                raise BadInput("absent in source")
            return encoder.load(dataset.raw(modality, ref)), None
        except BadInput as e:
            return None, str(e)

    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        inputs, reasons = zip(*pool.map(load, records)) if records else ((), ())
    feats: list[dict] = [dict(placeholder, present=False) for _ in records]
    todo = [i for i, x in enumerate(inputs) if x is not None]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        t0 = time.perf_counter()
        enc = encoder.encode([inputs[i] for i in idx])
        timing[modality + "_s"] += time.perf_counter() - t0
        timing[modality + "_n"] += len(idx)
        for k, i in enumerate(idx):
            feats[i] = dict(_first(enc, k), present=True)
    return feats, list(reasons)


def _meta(cfg: ExperimentConfig, ds: Dataset, encoders: dict[str, Encoder], ph: dict[str, dict], fp: str) -> dict:
    return {
        "name": store_name(cfg), "dataset": ds.name, "dataset_version": ds.version, "fingerprint": fp,
        "modalities": ds.modalities, "classes": ds.classes, "task": ds.task,
        "encoders": {m: e.fingerprint for m, e in encoders.items()},
        "vec_dim": {m: int(p["vec"].shape[-1]) for m, p in ph.items()},
        "tok_dim": {m: int(p["tok"].shape[-1]) for m, p in ph.items()},
        "tok_len": {m: int(p["tok"].shape[0]) for m, p in ph.items()},
        "emb_dim": {m: int(p["emb"].shape[-1]) for m, p in ph.items() if p.get("emb") is not None},
        "emb_len": {m: int(p["emb"].shape[0]) for m, p in ph.items() if p.get("emb") is not None},
        "data_config": cfg.data.model_dump(mode="json"), "created": now(),
    }


def extract(cfg: ExperimentConfig, progress: bool = True, max_rows: int | None = None) -> ExtractReport:
    """Extract every record not yet in the store. Each ``store.write_every`` rows are one atomic Lance commit,
    so a crash loses at most the batch in flight and a rerun resumes without duplicates. ``max_rows`` stops
    after that many new rows (incremental runs, tests)."""
    t_start = time.perf_counter()
    ds = load_dataset(cfg.data)
    ids = [r.id for r in ds.records]
    if len(set(ids)) != len(ids):
        dup = [k for k, n in Counter(ids).items() if n > 1]
        raise StoreError(f"dataset {ds.name} has duplicate ids, e.g. {dup[:5]}")
    enc_cfgs = cfg.encoder_configs()
    if missing := [m for m in ds.modalities if m not in enc_cfgs]:
        raise StoreError(f"no encoder configured for modalities {missing} of dataset {ds.name}")
    store = FeatureStore(cfg.store.root, store_name(cfg))
    with store.writer_lock(cfg.store.lock_timeout_s):
        encoders = {m: build_encoder(m, enc_cfgs[m]) for m in ds.modalities}
        fp = fingerprint(ds.version, {m: e.fingerprint for m, e in encoders.items()})
        ph = {m: _first(encoders[m].encode_placeholder()) for m in ds.modalities}
        if store.exists:
            if store.meta["fingerprint"] != fp:
                raise StoreError(f"store {store.name} holds fingerprint {store.meta['fingerprint']} but the dataset "
                                 f"and encoders now give {fp} (data or encoder changed); extract into a new "
                                 "store.root or remove the old table")
            meta = store.meta
        else:
            meta = _meta(cfg, ds, encoders, ph, fp)
            store.set_placeholders(ph)
            store.create(meta)
        done = store.existing_ids()
        todo = [r for r in ds.records if r.id not in done][:max_rows]
        timing: Counter = Counter()
        bar = tqdm(total=len(todo), desc=f"extract {store.name}", disable=not progress, unit="item")
        for start in range(0, len(todo), cfg.store.write_every):
            chunk = todo[start : start + cfg.store.write_every]
            per_mod = {m: _encode_modality(encoders[m], ds, m, chunk, enc_cfgs[m].batch_size, ph[m], timing)
                       for m in ds.modalities}
            rows = []
            for i, r in enumerate(chunk):
                issues = {m: per_mod[m][1][i] for m in ds.modalities if per_mod[m][1][i]}
                rows.append({"id": r.id, "split": r.split, "label": -1 if isinstance(r.label, list) else r.label,
                             "labels": r.label if isinstance(r.label, list) else [r.label],
                             "source": json.dumps({m: str(v) if v is not None else None for m, v in r.payload.items()
                                                   if not isinstance(v, np.ndarray)}),
                             "issues": json.dumps(issues) if issues else None,
                             **{m: per_mod[m][0][i] for m in ds.modalities}})
            for m in ds.modalities:  # grow padded lengths before the rows land, so meta always covers them
                meta["tok_len"][m] = max(meta["tok_len"][m], *(r[m]["tok"].shape[0] for r in rows))
                if m in meta["emb_len"]:
                    meta["emb_len"][m] = max(meta["emb_len"][m], *(r[m]["emb"].shape[0] for r in rows))
            store.write_meta(meta)
            store.add_rows(rows)
            bar.update(len(chunk))
        bar.close()
        tbl = store.table
        meta["missing_counts"] = _missing_counts(store, ds.modalities)
        indices = store.build_index(cfg.store.index_min_rows) if todo else [i.name for i in tbl.list_indices()]
        meta.update(rows=tbl.count_rows(), lance_version=store.table.version, updated=now())
        store.write_meta(meta)
    return ExtractReport(store.name, fp, len(todo), len(done), meta["rows"], meta["lance_version"],
                         meta["missing_counts"], time.perf_counter() - t_start,
                         {m: timing[m + "_n"] / timing[m + "_s"] for m in ds.modalities if timing[m + "_s"]}, indices)


def _missing_counts(store: FeatureStore, modalities: list[str]) -> dict[str, dict[str, int]]:
    """Missing rows per modality, by reason, counted from the table itself (correct after any crash)."""
    tbl = store.table
    out: dict[str, dict[str, int]] = {m: {} for m in modalities}
    t = tbl.search().where("issues IS NOT NULL").select(["issues"]).limit(max(tbl.count_rows(), 1)).to_arrow()
    for raw in t["issues"].to_pylist():
        for m, reason in json.loads(raw).items():
            key = reason.split(":")[0]
            out[m][key] = out[m].get(key, 0) + 1
    return out
