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
from contextlib import ExitStack
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from models.config import EncoderConfig, ExperimentConfig
from models.records import ExtractReport
from stores.datasets import Dataset, load_dataset
from stores.datasets.base import groups
from stores.encoders.stream import encode_stream
from stores.encoders import Encoder, build_encoder, encoder_fingerprint
from stores.encoders.base import check_model_path
from stores.encoders import LOAD_WORKERS
from . import freshness
from stores.extraction.entities import SEARCH_COLUMNS, KnownInputs, SearchDiff, entity_batches, work_schema
from stores.extraction.heap import trim
from stores.extraction.key_index import KeyIndex, appended_rowids
from stores.features.feature_store import FeatureStore, StoreError
from stores.features.history import keep_run_versions
from stores.features.spool import ArrowSpool
from stores.features.views import View, now, write_json


TRIM_EVERY = 16  # chunks (commits) between two heap trims


class LazyEncoders(dict):
    """modality -> Encoder, each built on first use (loading weights takes seconds; an incremental run whose
    inputs are all in the views needs none)."""

    def __init__(self, configs: dict[str, EncoderConfig]):
        super().__init__()
        self.configs = configs
        self.load_seconds = 0.0  # building them: imports and weights

    def __missing__(self, m: str) -> Encoder:
        t0 = time.perf_counter()
        self[m] = build_encoder(m, self.configs[m])
        self.load_seconds += time.perf_counter() - t0
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


def extract(cfg: ExperimentConfig, progress: bool = True, max_rows: int | None = None,
            use_record: bool = True) -> ExtractReport:
    """Bring the store up to date with the source and the config's encoders. Each ``store.write_every`` rows
    are one atomic commit per view and one to the search table, so a crash loses at most the batch in flight
    and a rerun resumes without duplicates. ``max_rows`` stops after that many rows (incremental runs, tests).
    A store whose record shows unchanged shards is answered from it (``freshness``; ``use_record=False`` reads
    the source regardless).

    Memory does not grow with the source's payloads: the source is read twice as a stream of record batches
    (once to hash every input into the dataset table's rows, compared batch by batch with the stored dataset and
    search tables, once to encode the rows that need it, spooled in between on local disk), and what is kept
    whole is compact: each stored table's ids with 8-byte row digests (``RowDigests``), each view's keys as a
    ``KeyIndex``."""
    if use_record and max_rows is None and (unchanged := freshness.unchanged_report(cfg)) is not None:
        return unchanged
    t_start = time.perf_counter()
    ds = load_dataset(cfg.data)
    listing = ds.listing() if ds.listing else None  # the shards as this run reads them (freshness.record)
    enc_cfgs = cfg.encoder_configs()
    if missing := [m for m in ds.modalities if m not in enc_cfgs]:
        raise StoreError(f"no encoder configured for modalities {missing} of dataset {ds.name}")
    for m in ds.modalities:  # before the store is touched: a wrong model path leaves nothing behind
        check_model_path(m, enc_cfgs[m].model)
    store = FeatureStore.for_config(cfg, ds.modalities)
    mods = ds.modalities
    with store.writer_lock(cfg.store.lock_timeout_s), ExitStack() as stack:
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

        work = stack.enter_context(ArrowSpool(work_schema(mods)))  # (local disk: the rows to write)
        # first pass over the source: every input hashed (unless a file's stat is unchanged), the dataset table
        # brought up to date, and the rows the search table lacks or holds stale set aside in source order
        old = store.entity_digests(mods)
        diff = SearchDiff(store.search_digests([*SEARCH_COLUMNS, *(f"{m}_key" for m in mods)]), mods, work)
        seen: Counter = Counter()
        with ThreadPoolExecutor(LOAD_WORKERS) as pool:
            known = KnownInputs(store, old) if old is not None else None
            changes = store.sync_entities(diff.tap(entity_batches(ds, known, pool, seen)), mods, old)
        del old, known
        trim()  # (stores/extraction/heap.py: after each phase that allocates and frees large buffers)
        _record_dataset(store, ds, cfg)
        if not store.meta_path.exists():  # readable as soon as its first rows land, even if this run dies
            store.write_meta({**store.meta.as_dict(), "kind": "config", "data_config": cfg.data.model_dump(mode="json"),
                              "created": now()})
        store.delete_search(diff.gone())
        index = {m: KeyIndex.of_table(views[m].table()) for m in mods}
        timing: Counter = Counter()
        n_work = work.num_rows if max_rows is None else min(work.num_rows, max_rows)
        bar = tqdm(total=n_work, desc=f"extract {store.name}", disable=not progress, unit="item")
        plan = _plan(groups(_work_rows(ds, work.batches(), n_work), cfg.store.write_every), mods, index)
        commits = added = 0
        for window in _windows(plan, cfg):  # second pass over the source: only the rows that need writing
            encoded = _encoded(cfg, window, encoders, lambda m, pairs: [(k, ds.raw(m, ref)) for k, ref in pairs])
            for chunk, _ in window:
                feats = {}
                for m in mods:
                    new_inputs, seconds = next(encoded)  # this chunk's inputs of modality m that the view lacks
                    timing[m + "_s"] += seconds
                    timing[m + "_n"] += len(new_inputs)
                    feats[m] = _view_features(views[m], encoders[m], m, chunk, new_inputs, index[m])
                _write_search(store, chunk, feats, mods, vec_dim)
                added += sum(r["new_in_search"] for r in chunk)
                bar.update(len(chunk))
                if (commits := commits + 1) % TRIM_EVERY == 0:
                    trim()
            encoded.close()  # the ray engine's job ends here (or when an error unwinds this frame)
        bar.close()

        tbl = store.table
        changed = bool(n_work) or bool(changes.removed)
        trained = store.config_meta.get("index_trained_rows") if store.meta_path.exists() else None
        if changed:
            trim()
            store.compact(after_each=trim)  # at store.max_fragments
            indices, trained = store.update_index(cfg.store.index_min_rows, cfg.store.index_retrain_growth, trained,
                                                  cfg.store.index_kmeans_iterations)
            trim()
            keep_run_versions(store.location, store.written_tables(), cfg.store.version_grace_s, after_each=trim)
        else:
            indices = [i.name for i in tbl.list_indices()]
        meta = store.meta
        out = {**meta.as_dict(), "kind": "config", "data_config": cfg.data.model_dump(mode="json"),
               "missing_counts": _missing_counts(store, mods), "rows": tbl.count_rows(), "updated": now(),
               "created": store.config_meta.get("created", now()) if store.meta_path.exists() else now(),
               "index_trained_rows": trained}
        # complete, every input inside the source's shards, and no shard changed while this run read them
        complete = n_work == work.num_rows and not seen["external"] and listing is not None and ds.listing() == listing
        fresh = freshness.record(cfg, store, listing if complete else None, {
            "fingerprint": meta.fingerprint, "source_rows": diff.rows, "rows": out["rows"],
            "missing_counts": out["missing_counts"], "indices": indices})
        store.write_meta({**out, **({freshness.KEY: fresh} if fresh else {})})
    return ExtractReport(store.name, meta.fingerprint, added, diff.rows - diff.stale, out["rows"],
                         meta.versions["dataset"], out["missing_counts"], time.perf_counter() - t_start,
                         {m: timing[m + "_n"] / timing[m + "_s"] for m in mods if timing[m + "_s"]}, indices,
                         {m: int(timing[m + "_n"]) for m in mods}, n_work - added, len(changes.removed),
                         meta.versions, encoders.load_seconds)


Chunk = tuple[list[dict], dict[str, list[tuple[str, Any]]]]


def _work_rows(ds: Dataset, work: Iterator[pa.RecordBatch], limit: int) -> Iterator[dict]:
    """The first ``limit`` spooled ``work`` rows (dataset-table rows plus ``new_in_search``, in source order),
    each with its ``payload`` (modality -> reference) from a second pass over the source, met in the same order:
    no index of either side is needed. The pass stops once the last work row is met."""
    rows = islice((row for b in work for row in b.to_pylist()), limit)
    todo = next(rows, None)
    for recs in ds.batches():
        for r in recs:
            if todo is None:
                return
            if r.id == todo["id"]:
                todo["payload"] = r.payload
                yield todo
                todo = next(rows, None)
    if todo is not None:
        raise StoreError(f"the source no longer holds row {todo['id']!r} that this extraction's first pass read "
                         "(it changed during the run); the rows written so far are kept, a rerun resumes")


def _plan(chunks: Iterable[list[dict]], mods: list[str], index: dict[str, KeyIndex]) -> Iterator[Chunk]:
    """Each chunk with, per modality, the (content key, raw reference) pairs to encode: keys neither in the view
    nor planned earlier in this run, each once (a later chunk reads it back from the view)."""
    for chunk in chunks:
        todo = {}
        for m in mods:
            first: dict[str, Any] = {}
            for r in chunk:
                first.setdefault(r[f"{m}_key"], r["payload"].get(m))
            keys = list(first)
            fresh = [k for k, known in zip(keys, index[m].contains(keys)) if not known]
            index[m].plan(fresh)
            todo[m] = [(k, first[k]) for k in fresh]
        yield chunk, todo


def _windows(plan: Iterator[Chunk], cfg: ExperimentConfig) -> Iterator[list[Chunk]]:
    """Chunks handed to the encoder together: one at a time in this process (``local``); for the ``ray`` engine
    up to ``ray.window_rows`` rows per streaming Ray Data job, so a job's start-up is shared by many chunks while
    the raw inputs in flight stay bounded."""
    size = 1 if cfg.store.extract_engine == "local" else max(1, cfg.ray.window_rows // cfg.store.write_every)
    return groups(plan, size)


def _encoded(cfg: ExperimentConfig, plan: list[Chunk], encoders: dict[str, Encoder],
             items: Callable[[str, list[tuple[str, Any]]], list[tuple[str, Any]]]) -> Iterator[tuple[list, float]]:
    """Per chunk and modality of ``plan``, in plan order, lazily: the list of (key, features or reason) and the
    seconds spent decoding and encoding it. Encoded in this process chunk by chunk (``store.extract_engine:
    local``), or by one streaming Ray Data job over the window of chunks (``ray``; seconds summed over its workers),
    its batches regrouped per chunk as they arrive."""
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
                   index: KeyIndex) -> dict[str, dict]:
    """key -> {present, reason, vec} for the chunk's keys of modality ``m``: the chunk's newly ``encoded`` inputs
    are committed to the view (one Lance commit) and located in ``index``, the rest read back from the view."""
    keys = list(dict.fromkeys(r[f"{m}_key"] for r in chunk))
    out: dict[str, dict] = {}
    if encoded:
        placeholder = encoder.encode_placeholder().item() if any(isinstance(f, str) for _, f in encoded) else None
        rows = [(k, dict(f, present=True, reason=None) if isinstance(f, dict) else
                 dict(placeholder, present=False, reason=f)) for k, f in encoded]
        view.add(rows)
        index.located([k for k, _ in rows], appended_rowids(view.table(), [k for k, _ in rows]))
        for k, f in rows:
            out[k] = {"present": f["present"], "reason": f["reason"], "vec": f["vec"]}
    rest = [k for k in keys if k not in out]
    if rest:
        rowids = index.rowids(rest)
        if (rowids < 0).any():
            raise StoreError(f"feature view {view.name} lacks keys {[k for k, r in zip(rest, rowids) if r < 0][:3]} "
                             "this run planned (an encoder batch was lost); a rerun resumes")
        t = view.take(view.table(), rowids.tolist(), ["key", "present", "reason", "vec"])
        for k, p, reason, vec in zip(t["key"].to_pylist(), t["present"].to_pylist(), t["reason"].to_pylist(),
                                     t["vec"].to_numpy(zero_copy_only=False)):
            out[k] = {"present": p, "reason": reason, "vec": np.asarray(vec, np.float32)}
        if lost := [k for k in rest if k not in out]:  # a digest collision in the index, or a removed row
            raise StoreError(f"feature view {view.name}: keys {lost[:3]} were not where its index said")
    return out


def _write_search(store: FeatureStore, chunk: list[dict], feats: dict[str, dict[str, dict]], mods: list[str],
                  vec_dim: dict[str, int]) -> None:
    """The chunk's rows of the search table: appended for ids new to it, merged on id for the others."""
    search = []
    for r in chunk:
        issues = {m: feats[m][r[f"{m}_key"]]["reason"] for m in mods if not feats[m][r[f"{m}_key"]]["present"]}
        search.append({**{c: r[c] for c in ("id", *SEARCH_COLUMNS)}, "issues": json.dumps(issues) if issues else None,
                       **{k: v for m in mods for k, v in ((f"{m}_key", r[f"{m}_key"]),
                                                          (f"{m}_present", feats[m][r[f"{m}_key"]]["present"]),
                                                          (f"{m}_vec", feats[m][r[f"{m}_key"]]["vec"]))}})
    fresh = [s for s, r in zip(search, chunk) if r["new_in_search"]]
    if fresh:
        store.upsert_search(fresh, vec_dim, new=True)
    if len(fresh) < len(search):
        store.upsert_search([s for s, r in zip(search, chunk) if not r["new_in_search"]], vec_dim, new=False)


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
