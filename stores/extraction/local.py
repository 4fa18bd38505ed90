"""Batched, incremental, resumable extraction into the feature views, the dataset table and the search table.

Only inputs whose content key is not yet in a modality's view are encoded: a new encoder for one modality
encodes only that modality, split/label changes encode nothing, a changed file is encoded again (new key),
rows removed from the source leave the dataset table (older Lance versions keep them)."""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from models.config import EncoderConfig, ExperimentConfig
from models.records import ExtractReport
from stores.datasets import Dataset, Record, load_dataset
from stores.datasets.base import describe_ref
from stores.encoders.stream import encode_stream
from stores.encoders import LOAD_WORKERS, Encoder, build_encoder, encoder_fingerprint
from stores.encoders.base import check_model_path
from stores.features.feature_store import FeatureStore, StoreError
from stores.features.views import ABSENT, View, content_key, now, write_json


class LazyEncoders(dict):
    """modality -> Encoder, each built on first use (loading weights takes seconds; an incremental run whose
    inputs are all in the views needs none)."""

    def __init__(self, configs: dict[str, EncoderConfig]):
        super().__init__()
        self.configs = configs

    def __missing__(self, m: str) -> Encoder:
        self[m] = build_encoder(m, self.configs[m])
        return self[m]


def encode_items(encoder: Encoder, modality: str, items: Iterable[tuple[str, Any]],
                 batch_size: int = 32) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """The encode step, one modality: (content key, raw input) pairs -> (key, features ``{vec, tok, emb}``) or
    (key, reason the input is unusable), in input order. Inputs decode on a thread pool a few batches ahead of
    the encoder (stores/encoders/stream.py), so host decoding overlaps the forward pass. The Ray Data version with
    the same contract is stores/extraction/ray.py."""
    items = list(items)
    for (key, _), (feats, reason) in zip(items, encode_stream(encoder, [raw for _, raw in items], batch_size)):
        yield key, feats if feats is not None else reason


def _stat(raw: Any) -> str | None:
    """(path, size, mtime) of a file input: an unchanged stat lets a rerun skip re-hashing the file."""
    if isinstance(raw, str) and Path(raw).is_file():
        st = Path(raw).stat()
        return json.dumps([raw, st.st_size, st.st_mtime_ns])
    return None


def entity_rows(ds: Dataset, old: dict[str, dict]) -> list[dict]:
    """The dataset table's rows: entity columns plus each modality's content key (re-hashed only when the
    file's stat changed)."""

    def row(r: Record) -> dict:
        out = {"id": r.id, "split": r.split, "label": -1 if isinstance(r.label, list) else r.label,
               "labels": r.label if isinstance(r.label, list) else [r.label],
               "source": json.dumps({m: describe_ref(v) for m, v in r.payload.items() if not isinstance(v, np.ndarray)})}
        prev = old.get(r.id, {})
        for m in ds.modalities:
            ref = r.payload.get(m)
            raw = None if ref is None else ds.raw(m, ref)
            stat = _stat(raw) if m != "text" else None
            if ref is None:
                key = ABSENT
            elif stat is not None and prev.get(f"{m}_stat") == stat:
                key = prev[f"{m}_key"]
            else:
                key = content_key(m, raw)
            out[f"{m}_key"], out[f"{m}_stat"] = key, stat
        return out

    with ThreadPoolExecutor(LOAD_WORKERS) as pool:  # file hashing releases the GIL
        return list(pool.map(row, ds.records))


SEARCH_COLUMNS = ("split", "label", "labels", "source")


def _up_to_date(row: dict, have: dict | None, modalities: list[str]) -> bool:
    return have is not None and all(have[c] == row[c] for c in SEARCH_COLUMNS) and \
        all(have[f"{m}_key"] == row[f"{m}_key"] for m in modalities)


def extract(cfg: ExperimentConfig, progress: bool = True, max_rows: int | None = None) -> ExtractReport:
    """Bring the store up to date with the source and the config's encoders. Each ``store.write_every`` rows
    are one atomic commit per view and one to the search table, so a crash loses at most the batch in flight
    and a rerun resumes without duplicates. ``max_rows`` stops after that many rows (incremental runs, tests)."""
    t_start = time.perf_counter()
    ds = load_dataset(cfg.data)
    ids = [r.id for r in ds.records]
    if len(set(ids)) != len(ids):
        dup = [k for k, n in Counter(ids).items() if n > 1]
        raise StoreError(f"dataset {ds.name} has duplicate ids, e.g. {dup[:5]}")
    enc_cfgs = cfg.encoder_configs()
    if missing := [m for m in ds.modalities if m not in enc_cfgs]:
        raise StoreError(f"no encoder configured for modalities {missing} of dataset {ds.name}")
    for m in ds.modalities:  # before the store is touched: a wrong model path leaves nothing behind
        check_model_path(m, enc_cfgs[m].model)
    store = FeatureStore.for_config(cfg, ds.modalities)
    mods = ds.modalities
    with store.writer_lock(cfg.store.lock_timeout_s):
        if store.dataset_meta_path.exists() and store.dataset_meta["modalities"] != mods:
            raise StoreError(f"dataset table {store.dataset} holds modalities {store.dataset_meta['modalities']} "
                             f"but the source now has {mods}; set data.name to a new dataset name")
        # with the ray engine the encoders here only name and create the views (placeholders): on the CPU
        local = {"device": "cpu"} if cfg.store.extract_engine == "ray" else {}
        encoders = LazyEncoders({m: enc_cfgs[m].model_copy(update=local) for m in mods})
        views = store.views()
        for m in mods:
            if views[m].exists:  # checked against the weights' files: a run with nothing to encode loads none
                views[m].check(encoder_fingerprint(m, enc_cfgs[m]))
            else:
                views[m].create(m, enc_cfgs[m], encoders[m].fingerprint, encoders[m].encode_placeholder().item())
        vec_dim = {m: views[m].meta["vec_dim"] for m in mods}

        rows = entity_rows(ds, store.entities())
        changes = store.sync_entities(rows, mods)
        _record_dataset(store, ds, cfg)
        if not store.meta_path.exists():  # readable as soon as its first rows land, even if this run dies
            store.write_meta({**store.meta.as_dict(), "kind": "config", "data_config": cfg.data.model_dump(mode="json"),
                              "created": now()})

        in_search = store.search_rows()
        stale = [r for r in rows if not _up_to_date(r, in_search.get(r["id"]), mods)]
        work = stale[:max_rows]
        current = set(ids)
        store.delete_search([i for i in in_search if i not in current])
        have = {m: views[m].row_ids(views[m].table()) for m in mods}
        timing: Counter = Counter()
        bar = tqdm(total=len(work), desc=f"extract {store.name}", disable=not progress, unit="item")
        raw_of = {r.id: r.payload for r in ds.records}
        plan = _plan(work, mods, have, cfg.store.write_every)
        encoded = _encoded(cfg, plan, encoders, lambda m, pairs: [(k, ds.raw(m, raw_of[i][m])) for k, i in pairs])
        for chunk, todo in plan:
            feats = {}
            for m in mods:
                new_inputs, seconds = next(encoded)  # this chunk's inputs of modality m that the view lacks
                timing[m + "_s"] += seconds
                timing[m + "_n"] += len(new_inputs)
                feats[m] = _view_features(views[m], encoders[m], m, chunk, new_inputs, have)
            search = []
            for r in chunk:
                issues = {m: feats[m][r[f"{m}_key"]]["reason"] for m in mods
                          if not feats[m][r[f"{m}_key"]]["present"]}
                search.append({**{c: r[c] for c in ("id", *SEARCH_COLUMNS)},
                               "issues": json.dumps(issues) if issues else None,
                               **{k: v for m in mods for k, v in ((f"{m}_key", r[f"{m}_key"]),
                                                                  (f"{m}_present", feats[m][r[f"{m}_key"]]["present"]),
                                                                  (f"{m}_vec", feats[m][r[f"{m}_key"]]["vec"]))}})
            fresh = [s for s in search if s["id"] not in in_search]
            if fresh:
                store.upsert_search(fresh, vec_dim, new=True)
            if len(fresh) < len(search):
                store.upsert_search([s for s in search if s["id"] in in_search], vec_dim, new=False)
            bar.update(len(chunk))
        encoded.close()  # the ray engine's job ends here (or when an error unwinds this frame)
        bar.close()

        added = sum(r["id"] not in in_search for r in work)
        tbl = store.table
        changed = bool(work) or bool(changes["removed"])
        trained = store.config_meta.get("index_trained_rows") if store.meta_path.exists() else None
        if changed:
            store.compact(cfg.store.max_fragments)
            indices, trained = store.update_index(cfg.store.index_min_rows, cfg.store.index_retrain_growth, trained)
        else:
            indices = [i.name for i in tbl.list_indices()]
        meta = store.meta
        out = {**meta.as_dict(), "kind": "config", "data_config": cfg.data.model_dump(mode="json"),
               "missing_counts": _missing_counts(store, mods), "rows": tbl.count_rows(), "updated": now(),
               "created": store.config_meta.get("created", now()) if store.meta_path.exists() else now(),
               "index_trained_rows": trained}
        store.write_meta(out)
    return ExtractReport(store.name, meta.fingerprint, added, len(rows) - len(stale), out["rows"],
                         meta.versions["dataset"], out["missing_counts"], time.perf_counter() - t_start,
                         {m: timing[m + "_n"] / timing[m + "_s"] for m in mods if timing[m + "_s"]}, indices,
                         {m: int(timing[m + "_n"]) for m in mods}, len(work) - added, len(changes["removed"]),
                         meta.versions)


Chunk = tuple[list[dict], dict[str, list[tuple[str, str]]]]


def _plan(work: list[dict], mods: list[str], have: dict[str, dict], write_every: int) -> list[Chunk]:
    """The work in commit chunks of ``write_every`` rows, each with, per modality, the (content key, id of its
    first row) pairs to encode: keys not in the view yet, each once per run (a later chunk reads it back)."""
    planned: dict[str, set[str]] = {m: set() for m in mods}
    plan = []
    for start in range(0, len(work), write_every):
        chunk, todo = work[start : start + write_every], {}
        for m in mods:
            first: dict[str, str] = {}
            for r in chunk:
                if (k := r[f"{m}_key"]) not in have[m] and k not in planned[m]:
                    first.setdefault(k, r["id"])
            planned[m].update(first)
            todo[m] = list(first.items())
        plan.append((chunk, todo))
    return plan


def _encoded(cfg: ExperimentConfig, plan: list[Chunk], encoders: dict[str, Encoder],
             items: Callable[[str, list[tuple[str, str]]], list[tuple[str, Any]]]) -> Iterator[tuple[list, float]]:
    """Per chunk and modality of ``plan``, in plan order, lazily: the list of (key, features or reason) and the
    seconds spent decoding and encoding it. Encoded in this process chunk by chunk (``store.extract_engine:
    local``), or by one streaming Ray Data job over the whole plan (``ray``; seconds summed over its workers), its
    batches regrouped per chunk as they arrive."""
    enc_cfgs = cfg.encoder_configs()
    if cfg.store.extract_engine == "local":
        for _, todo in plan:
            for m, pairs in todo.items():
                t0 = time.perf_counter()
                got = list(encode_items(encoders[m], m, items(m, pairs), enc_cfgs[m].batch_size)) if pairs else []
                yield got, time.perf_counter() - t0
        return
    from stores.extraction import ray as ray_extraction
    from stores.ray_cluster import connect

    size = {m: c.batch_size for m, c in enc_cfgs.items()}
    batches = [(m, _absolute(m, items(m, pairs[i : i + size[m]]))) for _, todo in plan
               for m, pairs in todo.items() for i in range(0, len(pairs), size[m])]
    if batches:  # a run with nothing to encode starts no cluster
        connect(cfg.ray)
    stream = ray_extraction.encode_batches(enc_cfgs, batches, actors=cfg.ray.encode_actors,
                                           cpus_per_actor=cfg.ray.encode_cpus_per_actor)
    try:
        for _, todo in plan:
            for m, pairs in todo.items():
                parts = [next(stream) for _ in range(-(-len(pairs) // size[m]))]
                got = [x for _, encoded, _ in parts for x in encoded]
                if [k for k, _ in got] != [k for k, _ in pairs]:  # a guard: order is Ray Data's promise
                    raise StoreError(f"the Ray encoder returned {m} inputs out of order; this chunk's search "
                                     "rows were not written (a rerun resumes)")
                yield got, sum(seconds for *_, seconds in parts)
    finally:
        stream.close()  # stops the Ray Data job if extraction ends early


def _absolute(m: str, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """File paths made absolute: a Ray worker's working directory is not the driver's."""
    if m == "text":
        return items
    return [(k, os.path.abspath(raw) if isinstance(raw, str) and os.path.exists(raw) else raw) for k, raw in items]


def _view_features(view: View, encoder: Encoder, m: str, chunk: list[dict], encoded: list[tuple[str, Any]],
                   have: dict[str, dict]) -> dict[str, dict]:
    """key -> {present, reason, vec} for the chunk's keys of modality ``m``: the chunk's newly ``encoded`` inputs
    are committed to the view (one Lance commit), the rest read back from the view."""
    keys = list(dict.fromkeys(r[f"{m}_key"] for r in chunk))
    out: dict[str, dict] = {}
    if encoded:
        placeholder = encoder.encode_placeholder().item() if any(isinstance(f, str) for _, f in encoded) else None
        rows = [(k, dict(f, present=True, reason=None) if isinstance(f, dict) else
                 dict(placeholder, present=False, reason=f)) for k, f in encoded]
        view.add(rows)
        for k, f in rows:
            out[k] = {"present": f["present"], "reason": f["reason"], "vec": f["vec"]}
            have[m][k] = None  # in the view; its row id is looked up only if a later chunk needs it
    rest = [k for k in keys if k not in out]
    if any(have[m][k] is None for k in rest):
        have[m].update(view.row_ids(view.table()))
    if rest:
        tbl = view.table()
        t = view.take(tbl, [have[m][k] for k in rest], ["key", "present", "reason", "vec"])
        for k, p, reason, vec in zip(t["key"].to_pylist(), t["present"].to_pylist(), t["reason"].to_pylist(),
                                     t["vec"].to_numpy(zero_copy_only=False)):
            out[k] = {"present": p, "reason": reason, "vec": np.asarray(vec, np.float32)}
    return out


def _record_dataset(store: FeatureStore, ds: Dataset, cfg: ExperimentConfig) -> None:
    """``<dataset>.json``: modalities and, per dataset-table version, the classes and task it was written with."""
    meta = json.loads(store.dataset_meta_path.read_text()) if store.dataset_meta_path.exists() else {
        "kind": "dataset", "name": store.dataset, "modalities": ds.modalities, "history": {}, "created": now()}
    version = store.entity_table().version
    last = meta["history"][max(meta["history"], key=int)] if meta["history"] else None
    state = {"classes": ds.classes, "task": ds.task}
    if last != state:
        meta["history"][str(version)] = state
    meta.update(data_config=cfg.data.model_dump(mode="json"), updated=now())
    write_json(store.dataset_meta_path, meta)


def _missing_counts(store: FeatureStore, modalities: list[str]) -> dict[str, dict[str, int]]:
    """Missing rows per modality, by reason, counted from the search table itself (correct after any crash)."""
    tbl = store.table
    out: dict[str, dict[str, int]] = {m: {} for m in modalities}
    t = tbl.search().where("issues IS NOT NULL").select(["issues"]).limit(max(tbl.count_rows(), 1)).to_arrow()
    for raw in t["issues"].to_pylist():
        for m, reason in json.loads(raw).items():
            key = reason.split(":")[0]
            out[m][key] = out[m].get(key, 0) + 1
    return out
