"""LanceDB feature store. Three kinds of table under ``store.root`` (a folder or an object-store URI such as
``s3://bucket/prefix``; stores/features/location.py holds everything that differs between the two):

- feature views ``view-<modality>-<hash>`` (stores/features/views.py): features per (modality, encoder), keyed by the
  content hash of the input, shared by every dataset and config that uses that encoder;
- the dataset (entity) table ``<data.dataset_name>``: id, split, label(s), source and each modality's content
  key, so split and label changes re-extract nothing and a changed file gets a new key;
- per config ``<dataset>-<hash of its views>``: the join materialised for filtered vector search (id, split,
  label, presence, issues and pooled vectors, with an IVF-PQ index), plus ``<name>.json`` metadata.

Training reads join the dataset table and the views at pinned Lance versions (``store.versions``), so a run
can be repeated on exactly the rows it read; decoded splits are cached by those versions (``split_cache``)."""
from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from lancedb.index import IvfPq

from models.config import DataConfig, EncoderConfig, ExperimentConfig, StoreConfig, runtime_fields
from models.heads.base import FeatureBatch, ModalitySpec
from models.records import StoreInfo, StoreMeta

from stores.features import filters
from stores.features.history import KEEP_EVERY_VERSION
from stores.features.location import StoreFile, StoreLocation
from stores.features.row_diff import IdIndex, RowDigests, diff_rows, duplicate_ids
from stores.features.spool import ArrowSpool
from stores.features.split_cache import SplitArrays, SplitCache
from stores.features.views import View, StoreError, fixed, now, view_name, write_json

__all__ = ["FeatureStore", "StoreError", "open_store", "store_name", "decode_tokens", "SplitFeatures", "now"]




def store_name(cfg: ExperimentConfig) -> str:
    """The config's search table: its dataset plus the views its encoders name (not splits, labels or limits)."""
    views = {m: view_name(m, e) for m, e in sorted(cfg.encoder_configs().items())}
    return f"{cfg.data.dataset_name}-{hashlib.sha256(json.dumps(views).encode()).hexdigest()[:10]}"


def legacy_store_name(cfg: ExperimentConfig) -> str:
    """The table name of the old layout (one table per dataset and encoder set), for migration."""
    data = cfg.data.model_dump(mode="json", exclude=runtime_fields(DataConfig))
    for added, default in (("classes", None), ("name", None), ("format", "auto"), ("columns", {}),
                           ("attributes", [])):
        if data.get(added) == default:  # fields added later: their defaults keep the names
            data.pop(added, None)
    enc = {m: e.model_dump(mode="json", exclude=set(runtime_fields(EncoderConfig))
                           | ({"decode"} if e.decode == "host" else set())  # added later: defaults keep names
                           | ({"embedding_tokens"} if e.embedding_tokens is None else set()))
           for m, e in cfg.encoder_configs().items()}
    key = hashlib.sha256(json.dumps([data, enc], sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset}-{key}"


def entity_schema(modalities: list[str]) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("split", pa.string()),
              pa.field("label", pa.int32()), pa.field("labels", pa.list_(pa.int32())), pa.field("source", pa.string()),
              pa.field("attrs", pa.string())]  # data.attributes as a JSON object (null: none kept)
    for m in modalities:  # stat: the file's (path, size, mtime) when its key was hashed, to skip re-hashing
        fields += [pa.field(f"{m}_key", pa.string()), pa.field(f"{m}_stat", pa.string())]
    return pa.schema(fields)


def search_schema(modalities: list[str], vec_dim: dict[str, int]) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("split", pa.string()),
              pa.field("label", pa.int32()), pa.field("labels", pa.list_(pa.int32())), pa.field("source", pa.string()),
              pa.field("issues", pa.string())]
    for m in modalities:
        fields += [pa.field(f"{m}_key", pa.string()), pa.field(f"{m}_present", pa.bool_()),
                   pa.field(f"{m}_vec", pa.list_(pa.float32(), vec_dim[m]))]
    return pa.schema(fields)


def decode_tokens(col: pa.ChunkedArray | pa.Array, lengths: np.ndarray, dim: int, pad_to: int,
                  order: np.ndarray | None = None,
                  out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary float16 blobs -> padded [N, pad_to, dim] float16 and mask [N, pad_to] (True = real token). Row
    ``order[i]`` of the column lands at output row i (default: same order); ``out``: zeroed arrays to write into
    (a slice of a memory-map) instead of new ones. One vectorised gather of every real token, no per-row loop."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    rows = np.arange(len(arr)) if order is None else np.asarray(order, np.int64)
    x, mask = out if out is not None else (np.zeros((len(rows), pad_to, dim), np.float16),
                                           np.zeros((len(rows), pad_to), bool))
    if len(rows) == 0:
        return x, mask
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    blob = arr.buffers()[2]
    data = np.frombuffer(blob, dtype=np.uint8)[: offsets[-1]] if blob is not None else np.zeros(0, np.uint8)
    toks = data.view(np.float16)[: len(data) // (2 * dim) * dim].reshape(-1, dim)  # every stored token
    counts = np.minimum(np.where(np.diff(offsets) > 0, lengths, 0), pad_to).astype(np.int64)[rows]
    mask[:] = np.arange(pad_to) < counts[:, None]
    first = np.cumsum(counts) - counts  # each output row's first token in the flat list of real tokens
    within = np.arange(int(counts.sum())) - np.repeat(first, counts)  # each real token's position in its row
    source = np.repeat(offsets[:-1][rows] // (2 * dim), counts) + within
    x[np.repeat(np.arange(len(rows)), counts), within] = toks[source]
    return x, mask


def scan_batches(tbl, columns: list[str], row_id: bool = False, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """A Lance table's rows as a stream of record batches of ``columns`` (plus ``_rowid``). The default batch is
    the source's (a dataset table's ``source`` cell holds a whole text: 1,024 rows of 16 KB captions are 16 MB)."""
    return tbl.search().select(columns).with_row_id(row_id).limit(None).to_batches(batch_rows)


def key_rows(view_table, keys: pa.ChunkedArray | pa.Array, batch_rows: int = 65536) -> np.ndarray:
    """The Lance row id in ``view_table`` of each of ``keys`` (-1 where the view holds none). The view's keys are
    streamed in batches and matched against the distinct keys wanted (an ``IdIndex``, built once), never gathered
    whole or into a Python dict; a key stored twice maps to its last row, as a dict of the scan would."""
    wanted = pc.unique(keys)
    where = IdIndex(wanted)
    found = np.full(len(wanted), -1, np.int64)
    for b in scan_batches(view_table, ["key"], row_id=True, batch_rows=batch_rows):
        at = pc.fill_null(where.index_in(b["key"]), -1).to_numpy()
        found[at[at >= 0]] = b["_rowid"].to_numpy()[at >= 0]
    at = pc.fill_null(where.index_in(keys), -1).to_numpy()
    return np.where(at >= 0, found[at], -1)


MAX_INDEX_DELTAS = 8  # an IVF-PQ index's parts (one per incremental extraction) before they are merged


@dataclass
class EntityChanges:
    """What ``sync_entities`` did: rows in the source, ids new to the dataset table, rows changed, ids removed."""
    rows: int
    new: int
    changed: int
    removed: list[str]


@dataclass
class SplitFeatures:
    ids: list[str]
    batch: FeatureBatch
    release: Callable[[], None] | None = None  # drops a memory-mapped batch's resident pages (split_cache.py)


class FeatureStore:
    """One config's view of the store: its dataset table, its feature views (one per modality) and its search
    table ``name``. ``versions`` pins Lance versions (``{"dataset": 3, "text": 7}``); unpinned parts read the
    latest. Constructed from a name alone it reads the views from ``<name>.json``. ``root`` is a folder, a URI
    (``s3://bucket/prefix``) or a StoreLocation (which carries the URI's storage options and cache folder)."""

    chunk_rows, chunk_bytes = 4096, 32 << 20  # a split decode step: at most this many rows and bytes of features

    def __init__(self, root: "Path | str | StoreLocation", name: str, read_cache: bool = True,
                 versions: dict[str, int] | None = None, dataset: str | None = None,
                 views: dict[str, str] | None = None, max_fragments: int = 8):
        self.location = StoreLocation.of(root)
        self.max_fragments = max_fragments  # store.max_fragments: the tables written outside extraction (masks)
        self.root, self.name = self.location.root, name
        self.db = self.location.connect()
        self.meta_path = self.location.file(f"{name}.json")
        self.pinned = dict(versions or {})
        self._dataset, self._views = dataset, views
        self.read_cache = read_cache
        # decoded splits stay on local disk: beside the tables for a folder, in the cache folder for a URI
        self.cache = SplitCache(self.location.cache_dir / f"{name}.cache") if read_cache else None
        self._lengths: dict[tuple[str, int], dict[str, int]] = {}
        self._meta_memo: tuple[tuple, StoreMeta] | None = None

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, modalities: list[str] | None = None) -> "FeatureStore":
        """The store a config reads; ``modalities`` (the dataset's) limits the views when known."""
        views = {m: view_name(m, e) for m, e in cfg.encoder_configs().items() if modalities is None or m in modalities}
        return cls(StoreLocation.for_config(cfg.store), store_name(cfg), read_cache=cfg.store.read_cache,
                   versions=cfg.store.versions, dataset=cfg.data.dataset_name, views=views,
                   max_fragments=cfg.store.max_fragments)

    def pin(self, versions: dict[str, int] | None = None) -> "FeatureStore":
        """The same store with every part pinned (default: at the versions it would read now)."""
        return FeatureStore(self.location, self.name, self.read_cache, versions or self.versions(), self.dataset,
                            self.view_names, self.max_fragments)

    def _has(self, table: str) -> bool:
        """Whether ``table`` exists with a first commit: a table being created is listed (its folder) a moment
        before it can be opened, which a reader running beside the extraction can see."""
        if table not in self.db.list_tables().tables:
            return False
        try:
            self.db.open_table(table)
        except ValueError:  # "Table ... was not found": created, not committed yet
            return False
        return True

    # ------------------------------------------------------------------ names and metadata
    @property
    def config_meta(self) -> dict:
        if not self.meta_path.exists():
            raise StoreError(f"no feature store {self.name!r} under {self.root}; run `mm extract` with this config")
        return json.loads(self.meta_path.read_text())

    @property
    def dataset(self) -> str:
        return self._dataset or self.config_meta["dataset"]

    @property
    def view_names(self) -> dict[str, str]:
        """modality -> view name, for the dataset's modalities (a config may name encoders for others)."""
        names = self._views or self.config_meta["views"]
        if self._dataset and self.dataset_meta_path.exists():
            return {m: names[m] for m in self.dataset_meta["modalities"] if m in names}
        return names

    @property
    def dataset_meta_path(self) -> StoreFile:
        return self.location.file(f"{self.dataset}.json")

    @property
    def dataset_meta(self) -> dict:
        if not self.dataset_meta_path.exists():
            raise StoreError(f"no dataset table {self.dataset!r} under {self.root}; run `mm extract`")
        return json.loads(self.dataset_meta_path.read_text())

    def views(self) -> dict[str, View]:
        return {m: View(self.db, self.location, v, self.pinned.get(m)) for m, v in self.view_names.items()}

    @property
    def exists(self) -> bool:
        return (self.meta_path.exists() and self.dataset_meta_path.exists() and self._has(self.name)
                and self._has(self.dataset) and all(v.exists for v in self.views().values()))

    @property
    def modalities(self) -> list[str]:
        return self.dataset_meta["modalities"]

    def write_meta(self, meta: dict) -> None:
        write_json(self.meta_path, meta)

    def entity_table(self, version: int | None = None):
        if not self._has(self.dataset):
            raise StoreError(f"dataset table {self.dataset!r} does not exist under {self.root}")
        tbl = self.db.open_table(self.dataset)
        v = version if version is not None else self.pinned.get("dataset")
        if v is not None:
            try:
                tbl.checkout(int(v))
            except Exception as e:  # noqa: BLE001 - Lance raises a bare error for a removed version
                raise StoreError(f"version {v} of dataset table {self.dataset} is not available ({e})") from None
        return tbl

    @property
    def table(self):
        """The search table (latest): the join of the dataset table and the views, with pooled vectors."""
        if not self._has(self.name):
            raise StoreError(f"feature table {self.name!r} does not exist under {self.root}")
        return self.db.open_table(self.name)

    def versions(self) -> dict[str, int]:
        """The Lance version of each part this store reads: pinned, else the latest."""
        out = {"dataset": int(self.pinned.get("dataset") or self.entity_table().version)}
        for m, v in self.views().items():
            out[m] = int(v.pinned or v.version)
        return out

    def lengths(self, modality: str, version: int) -> dict[str, int]:
        key = (modality, version)
        if key not in self._lengths:
            view = self.views()[modality]
            self._lengths[key] = view.lengths(view.table(version))
        return self._lengths[key]

    def dataset_state(self, version: int) -> dict:
        """Classes and task of the dataset table at ``version`` (recorded by each extraction that changed it)."""
        history = self.dataset_meta["history"]
        known = [int(v) for v in history if int(v) <= version]
        return history[str(max(known))] if known else history[min(history, key=int)]

    @property
    def meta(self) -> StoreMeta:
        """Everything about what this store reads, at its (pinned or latest) versions: modalities, classes,
        task, dims, padded lengths, encoder fingerprints, views and versions."""
        vers = self.versions()
        memo_key = tuple(sorted(vers.items()))
        if self._meta_memo and self._meta_memo[0] == memo_key:
            return self._meta_memo[1]
        views, ds = self.views(), self.dataset_meta
        state = self.dataset_state(vers["dataset"])
        vm = {m: v.meta for m, v in views.items()}
        mods = ds["modalities"]
        encoders = {m: vm[m]["encoder"] for m in mods}
        meta = StoreMeta(
            name=self.name, dataset=self.dataset, modalities=mods, classes=state["classes"], task=state["task"],
            views=self.view_names, versions=vers, dataset_version=f"{self.dataset}@{vers['dataset']}",
            encoders=encoders, vec_dim={m: vm[m]["vec_dim"] for m in mods},
            tok_dim={m: vm[m]["tok_dim"] for m in mods}, tok_len={m: self.lengths(m, vers[m])["tok"] for m in mods},
            emb_dim={m: vm[m]["emb_dim"] for m in mods if vm[m]["emb_dim"] is not None},
            emb_len={m: self.lengths(m, vers[m])["emb"] for m in mods if vm[m]["emb_dim"] is not None},
            fingerprint=hashlib.sha256(json.dumps([encoders, self.view_names, vers],
                                                  sort_keys=True).encode()).hexdigest()[:16])
        self._meta_memo = (memo_key, meta)
        return meta

    # ------------------------------------------------------------------ locking
    @contextmanager
    def writer_lock(self, timeout: float) -> Iterator[None]:
        """Exclusive write access to the dataset table and this config's views (locks taken in name order;
        stores/features/location.py: what a lock is on a folder and on a URI)."""
        names = sorted({self.dataset, *self.view_names.values()}) if self._dataset or self.meta_path.exists() \
            else [self.name]
        with ExitStack() as stack:
            for n in names:
                stack.enter_context(self.location.lock(n, timeout))
            yield

    # ------------------------------------------------------------------ writing (stores/extraction/local.py)
    def _dataset_table(self, modalities: list[str]):
        """The dataset table, created empty (or given the columns added since it was written) as needed."""
        if not self._has(self.dataset):
            return self.db.create_table(self.dataset, schema=entity_schema(modalities))
        tbl = self.db.open_table(self.dataset)
        if "attrs" not in tbl.schema.names:  # a store from before it
            tbl.add_columns(pa.field("attrs", pa.string()))
        return tbl

    def entity_digests(self, modalities: list[str]) -> RowDigests | None:
        """The latest dataset table as ``RowDigests`` (None before the first extraction): ``row`` digests every
        column but the id, ``<m>_stat`` each file modality's stat; with Lance row ids (``entity_values``)."""
        if not self._has(self.dataset):
            return None
        cols = [f.name for f in entity_schema(modalities) if f.name != "id"]
        return RowDigests(scan_batches(self._dataset_table(modalities), ["id", *cols], row_id=True),
                          {"row": cols, **{f"{m}_stat": [f"{m}_stat"] for m in modalities if m != "text"}})

    def entity_values(self, rowids: np.ndarray, column: str) -> list:
        """``column`` of the latest dataset table's rows at Lance ``rowids``, in the order given."""
        if not len(rowids):
            return []
        got = self.db.open_table(self.dataset).take_row_ids([int(r) for r in rowids]).select([column]) \
            .with_row_id().to_arrow()
        order = np.argsort(got["_rowid"].to_numpy())
        at = order[np.searchsorted(got["_rowid"].to_numpy()[order], rowids.astype(np.uint64))]
        return got[column].take(pa.array(at)).to_pylist()

    def entities(self) -> dict[str, dict]:
        """The latest dataset table as id -> row (small tables, tests; extraction compares digests)."""
        if not self._has(self.dataset):
            return {}
        tbl = self.db.open_table(self.dataset)
        return {r["id"]: r for r in tbl.search().limit(None).to_arrow().to_pylist()}

    def sync_entities(self, rows: "pa.Table | list[dict] | Iterable[pa.RecordBatch]", modalities: list[str],
                      old: RowDigests | None = None) -> "EntityChanges":
        """Make the dataset table hold exactly ``rows`` (a table, dicts, or a stream of record batches, read
        once). Each batch is compared with ``old`` (the table's digests, read here when not given); new and
        changed rows wait in a local spool until the stream has ended and its ids proved unique, then land in
        one commit (an append, or a merge on id when some changed), removed ids in another; earlier versions
        keep the old rows. Holds the digests and the ids, never the rows of either side."""
        schema = entity_schema(modalities)
        if isinstance(rows, list):
            rows = pa.Table.from_pylist(rows, schema=schema)
        batches = rows.cast(schema).to_batches() if isinstance(rows, pa.Table) else rows
        tbl = self._dataset_table(modalities)
        if old is None:
            old = self.entity_digests(modalities)
        ids, n_new, n_changed = [], 0, 0
        with ArrowSpool(schema) as write:
            for b in batches:
                ids.append(b["id"])
                pos, changed = diff_rows(old, b)
                write.add(b.filter(pa.array(changed)))
                n_new += int((pos < 0).sum())
                n_changed += int((changed & (pos >= 0)).sum())
            if dup := duplicate_ids(pa.chunked_array(ids, pa.string())):
                raise StoreError(f"dataset {self.dataset} has duplicate ids, e.g. {dup[:5]}")
            if n_changed:
                tbl.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(write.reader())
            elif n_new:
                tbl.add(write.reader())
        removed = old.unseen_ids() if old is not None else []
        if removed:
            tbl.delete(filters.isin("id", removed))
        return EntityChanges(sum(len(i) for i in ids), n_new, n_changed, removed)

    def search_digests(self, columns: list[str]) -> RowDigests | None:
        """This config's search table as ``RowDigests`` of ``columns`` (``row``); None before it exists."""
        if not self._has(self.name):
            return None
        return RowDigests(scan_batches(self.table, ["id", *columns]), {"row": columns})

    def upsert_search(self, rows: list[dict], vec_dim: dict[str, int], new: bool) -> None:
        """One commit: append (``new``) or merge on id. Rows: entity columns, issues and per modality
        ``<m>_key``, ``<m>_present``, ``<m>_vec``."""
        schema = search_schema(list(self.view_names), vec_dim)
        if not self._has(self.name):
            self.db.create_table(self.name, schema=schema)
        cols: dict[str, Any] = {f.name: [r[f.name] for r in rows] for f in schema if not f.name.endswith("_vec")}
        for m in self.view_names:
            cols[f"{m}_vec"] = fixed(np.stack([r[f"{m}_vec"] for r in rows]))
        t = pa.table(cols, schema=schema)
        if new:
            self.table.add(t)
        else:
            self.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(t)

    def delete_search(self, ids: list[str]) -> None:
        if ids and self._has(self.name):
            self.table.delete(filters.isin("id", ids))

    def update_index(self, min_rows: int, retrain_growth: float, trained_rows: int | None,
                     kmeans_iterations: int = StoreConfig.model_fields["index_kmeans_iterations"].default
                     ) -> tuple[list[str], int | None]:
        """IVF-PQ cosine index on each pooled vector column of the search table once it has ``min_rows`` rows.
        Trained (centroids and codebooks) when there is none or the table has grown ``retrain_growth`` times since
        ``trained_rows``; otherwise the new rows are added to the existing index (Lance's ``optimize_indices``),
        so an incremental extraction pays for its new rows, not for the table. The IVF centroids are trained with
        ``kmeans_iterations`` k-means iterations. Returns the indexed columns and the row count the index was
        trained on."""
        tbl = self.table
        n = tbl.count_rows()
        if n < min_rows:
            return [], trained_rows
        indexed = {c for i in tbl.list_indices() for c in i.columns}
        wanted = {f"{m}_vec": view for m, view in self.views().items()}
        if trained_rows and set(wanted) <= indexed and n < trained_rows * retrain_growth:
            self._add_to_index(tbl)
            return sorted(wanted), trained_rows
        for column, view in wanted.items():
            dim = view.meta["vec_dim"]
            sub = next(s for s in (dim // 16, dim // 8, dim // 4, dim // 2, 1) if s and dim % s == 0)
            tbl.create_index(column, config=IvfPq(distance_type="cosine", num_partitions=max(1, int(np.sqrt(n))),
                                                  num_sub_vectors=sub, max_iterations=kmeans_iterations),
                             replace=True)
        return sorted(wanted), n

    def _add_to_index(self, tbl) -> None:
        """The rows no index covers go into a new delta index of each column (Lance's ``optimize_indices`` with
        ``num_indices_to_merge=0``: cost in the new rows); an index of ``MAX_INDEX_DELTAS`` parts is merged
        into one instead. Merging on every run (lancedb's ``optimize``) rewrote the whole index each time: 2.3 s
        against 0.2 s for 1,280 new rows on a 128k-row table, so an incremental run cost O(N)."""
        ds = self.location.lance_dataset(self.name)  # (lancedb's optimize always merges)
        for index in tbl.list_indices():
            if (stats := tbl.index_stats(index.name)) is None or not stats.num_unindexed_rows:
                continue
            merge = stats.num_indices if stats.num_indices >= MAX_INDEX_DELTAS else 0
            ds.optimize.optimize_indices(index_names=[index.name], num_indices_to_merge=merge)

    def written_tables(self) -> list[str]:
        """The tables an extraction of this config writes: dataset, views, search."""
        return [n for n in dict.fromkeys([self.dataset, *self.view_names.values(), self.name]) if self._has(n)]

    def compact(self, after_each: Callable[[], object] = lambda: None) -> dict[str, int]:
        """``compact_table`` on each table this config writes (dataset, views, search, masks), calling
        ``after_each`` after each (the extraction hands the freed heap back between them). Returns the fragments
        per table after."""
        out = {}
        for name in [*self.written_tables(), self.dataset + "-masks"]:
            if self._has(name):
                out[name] = self.compact_table(self.db.open_table(name))
                after_each()
        return out

    def compact_table(self, tbl) -> int:
        """Merge ``tbl``'s data files when its latest version holds more than ``max_fragments`` of them (Lance's
        compaction: a new version; older versions, and so every version a run pinned, stay readable until
        ``mm store gc``). Returns its fragments after."""
        if tbl.stats()["fragment_stats"]["num_fragments"] > self.max_fragments:
            tbl.optimize(cleanup_older_than=KEEP_EVERY_VERSION)
        return tbl.stats()["fragment_stats"]["num_fragments"]

    # ------------------------------------------------------------------ reading
    def spec(self) -> ModalitySpec:
        meta, ph = self.meta, self.placeholders(("vec",))
        return ModalitySpec(meta.modalities, meta.vec_dim, meta.tok_dim, meta.tok_len, len(meta.classes), meta.task,
                            meta.emb_dim, meta.emb_len, placeholder_vec={m: v[0] for m, v in ph.vec.items()})

    def read_split(self, split: str, inputs: tuple[str, ...] = ("vec",)) -> SplitFeatures:
        """Every row of ``split`` as one FeatureBatch of CPU tensors (ids sorted), the dataset table joined with
        the views at the versions this store reads. Served from the decoded split cache when it holds exactly
        those versions; otherwise decoded from Lance chunk by chunk straight into a new cache entry's
        memory-maps (``_decode``), and served from there: no read holds a whole split in memory (without a
        cache, or when it cannot be written, the split is decoded into memory). Rows whose features are not
        extracted yet are left out."""
        inputs = tuple(sorted(set(inputs)))
        store = self.pin()  # one set of versions for the whole read, even if a writer commits meanwhile
        vers = store.pinned
        if self.cache is not None:
            if (hit := self.cache.load(vers, split, inputs)) is not None:
                return SplitFeatures(*hit)
            try:
                with self.cache.writer(vers, split, inputs) as entry:
                    store._decode(split, inputs, entry)
                if (hit := self.cache.load(vers, split, inputs)) is not None:
                    return SplitFeatures(*hit)
            except OSError as e:  # a read-only or full disk costs speed, never the read
                warnings.warn(f"split cache not written ({e}); reads decode from Lance", stacklevel=2)
        arrays = store._decode(split, inputs, SplitArrays())
        return SplitFeatures(arrays.ids, arrays.batch())

    # LanceDB 0.40's Permutation / StreamingDataset stream ONE table's rows (filtered, shuffled by their own seeded
    # permutation): a split here is the dataset table joined by content key with one view per modality, in id
    # order, and training shuffles with its own torch generator (the draws trained numbers depend on). So the
    # join is done here, streamed in chunks into the split cache's memory-maps, and batches are sampled there.
    def _decode(self, split: str, inputs: tuple[str, ...], out: SplitArrays) -> SplitArrays:
        """Decode ``split`` into ``out``'s arrays (ids sorted): the dataset table's rows joined with the views
        (``_split_rows``), then ``chunk_rows`` rows (at most ``chunk_bytes`` of features) at a time: per view one
        Lance take of the chunk's rows, decoded with Arrow/numpy into the chunk's slice of each array."""
        t, rowids = self._split_rows(split)
        n, out.ids = t.num_rows, t["id"].to_pylist()
        kinds = self._allocate(out, n, inputs)
        row_bytes = sum(a.nbytes for a in out.arrays.values()) // max(n, 1)
        step = max(1, min(self.chunk_rows, self.chunk_bytes // max(row_bytes, 1)))
        tables = {m: v.table() for m, v in self.views().items()}
        for start in range(0, n, step):
            part = slice(start, min(n, start + step))
            self._fill_labels(out.arrays["y"][part], t.slice(part.start, part.stop - part.start))
            for i, m in enumerate(self.modalities):
                self._fill_features(out, part, i, m, tables[m], rowids[m][part], kinds[m])
        return out

    def _allocate(self, out: SplitArrays, n: int, inputs: tuple[str, ...]) -> dict[str, list[str]]:
        """``out``'s (zeroed) arrays for ``n`` rows; returns the feature kinds read per modality."""
        meta, mods = self.meta, self.modalities
        multilabel = meta.task == "multilabel"
        out.new("present", (n, len(mods)), bool)
        out.new("y", (n, len(meta.classes)) if multilabel else (n,), np.float32 if multilabel else np.int64)
        kinds = {m: ["vec"] * ("vec" in inputs) + [k for k in ("tok", "emb")
                                                    if k in inputs and m in getattr(meta, f"{k}_dim")] for m in mods}
        for m in mods:  # (each field's modalities in the dataset's order, as FeatureBatch.from_tensors keeps them)
            for k in kinds[m]:
                if k == "vec":
                    out.new(f"vec__{m}", (n, meta.vec_dim[m]), np.float32)
                    continue
                length, dim = getattr(meta, f"{k}_len")[m], getattr(meta, f"{k}_dim")[m]
                out.new(f"{k}__{m}", (n, length, dim), np.float16)
                out.new(f"{k}_mask__{m}", (n, length), bool)
        return kinds

    def _fill_labels(self, y: np.ndarray, t: pa.Table) -> None:
        """The chunk ``t``'s labels into its rows of ``y`` (class index, or multi-hot for multilabel)."""
        if y.ndim == 1:
            y[:] = t["label"].to_numpy().astype(np.int64)
            return
        lists = t["labels"].combine_chunks()
        y[pc.list_parent_indices(lists).to_numpy(), pc.list_flatten(lists).to_numpy()] = 1

    def _fill_features(self, out: SplitArrays, part: slice, i: int, m: str, tbl, rowids: np.ndarray,
                       kinds: list[str]) -> None:
        """Modality ``m``'s presence and features of the rows ``part`` (view rows ``rowids``) into ``out``."""
        meta = self.meta
        columns = ["present"] + [c for k in kinds for c in ((k,) if k == "vec" else (k, f"n{k}"))]
        rows, back = self._take(tbl, rowids, columns)
        out.arrays["present"][part, i] = rows["present"].fill_null(False).to_numpy(zero_copy_only=False)[back]
        for k in kinds:
            if k == "vec":
                vec = rows["vec"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                out.arrays[f"vec__{m}"][part] = vec.reshape(-1, meta.vec_dim[m])[back]
            else:
                decode_tokens(rows[k], rows[f"n{k}"].fill_null(0).to_numpy(), getattr(meta, f"{k}_dim")[m],
                              getattr(meta, f"{k}_len")[m], back,
                              out=(out.arrays[f"{k}__{m}"][part], out.arrays[f"{k}_mask__{m}"][part]))

    def attribute_values(self, split: str, ids: list[str], column: str) -> list[str | None]:
        """The value of the kept source column ``column`` (``data.attributes``) of each of ``ids`` in ``split``,
        from the (pinned) dataset table; a StoreError when the store keeps no such column."""
        ent = self.entity_table()
        kept = "attrs" in ent.schema.names
        t = ent.search().where(filters.eq("split", split)).select(["id", "attrs"]).limit(None).to_arrow() \
            if kept else None
        # one JSON object per row, parsed in Python: only when a by_column mask is first made (then it is saved)
        rows = [json.loads(a) if a else {} for a in t["attrs"].take(
            pc.index_in(pa.array(ids, pa.string()), value_set=t["id"])).to_pylist()] if kept else []
        if not any(column in r for r in rows):
            raise StoreError(f"store {self.name} keeps no column {column!r} for {split}: add it to data.attributes "
                             "and run mm extract again")
        return [r.get(column) for r in rows]

    def _split_rows(self, split: str) -> tuple[pa.Table, dict[str, np.ndarray]]:
        """The dataset table's rows of ``split`` whose every modality is extracted, sorted by id (id, label,
        labels), and per modality the Lance row id of each row's features in its view."""
        ent, views = self.entity_table(), self.views()
        cols = ["id", "label", "labels"] + [f"{m}_key" for m in self.modalities]
        t = ent.search().where(filters.eq("split", split)).select(cols).limit(None).to_arrow()
        rowids = {m: key_rows(views[m].table(), t[f"{m}_key"]) for m in self.modalities}
        keep = np.ones(t.num_rows, bool)
        for r in rowids.values():
            keep &= r >= 0
        t = t.filter(pa.array(keep))
        order = pc.sort_indices(t["id"]).to_numpy()  # stable; UTF-8 byte order is Python's str order
        return t.select(["id", "label", "labels"]).take(order), {m: r[keep][order] for m, r in rowids.items()}

    @staticmethod
    def _take(tbl, rowids: np.ndarray, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
        """The view rows ``rowids`` (repeats allowed), each distinct one read once, and the position in that
        table of each of ``rowids``."""
        uniq, back = np.unique(rowids, return_inverse=True)
        if len(uniq) == 0:
            return tbl.search().select(columns).limit(1).to_arrow().slice(0, 0), back
        got = tbl.take_row_ids(uniq.tolist()).select(columns + ["_rowid"]).to_arrow()  # (in row id order)
        if not np.array_equal(got["_rowid"].to_numpy(), uniq):
            got = got.take(pc.index_in(pa.array(uniq, got["_rowid"].type), value_set=got["_rowid"]))
        return got, back

    def placeholders(self, inputs: tuple[str, ...] = ("vec", "tok", "emb")) -> FeatureBatch:
        """One-row FeatureBatch per modality's placeholder features (same padding as read_split)."""
        meta = self.meta
        b = FeatureBatch(torch.zeros(1, len(meta.modalities), dtype=torch.bool), torch.zeros(1, dtype=torch.long))
        for m, view in self.views().items():
            row = view.placeholder(view.table(meta.versions[m]))
            if "vec" in inputs:
                b.vec[m] = torch.tensor(row["vec"][0].as_py(), dtype=torch.float32)[None]
            for kind, dim, length in (("tok", meta.tok_dim, meta.tok_len), ("emb", meta.emb_dim, meta.emb_len)):
                if kind in inputs and m in dim:
                    x, mask = decode_tokens(row[kind], row[f"n{kind}"].fill_null(0).to_numpy(), dim[m], length[m])
                    getattr(b, kind)[m], getattr(b, f"{kind}_mask")[m] = torch.from_numpy(x), torch.from_numpy(mask)
        return b

    # ------------------------------------------------------------------ search & info
    def search(self, vector: np.ndarray, modality: str, k: int = 5, where: str | None = None,
               exact: bool = False, nprobes: int = 20) -> pa.Table:
        """Top-k cosine neighbours; ``where`` is a filter from stores/features/filters.py, applied before the search.
        With an IVF-PQ index, ``nprobes`` partitions are scanned and 10 x k candidates re-ranked exactly
        (bench/store_io.py: recall vs nprobes); ``exact`` scans every row."""
        q = self.table.search(np.asarray(vector, np.float32), vector_column_name=f"{modality}_vec").metric("cosine")
        if where:
            q = q.where(where, prefilter=True)
        q = q.bypass_vector_index() if exact else q.nprobes(nprobes).refine_factor(10)
        cols = ["id", "split", "label", "source", "_distance"] + [f"{m}_present" for m in self.modalities]
        return q.select(cols).limit(k).to_arrow()

    def vector_of(self, id_: str, modality: str) -> np.ndarray:
        t = self.table.search().where(filters.eq("id", id_)).select([f"{modality}_vec"]).limit(1).to_arrow()
        if t.num_rows == 0:
            raise StoreError(f"id {id_!r} not in store {self.name}")
        return np.asarray(t[f"{modality}_vec"][0].as_py(), np.float32)

    def lineage(self) -> dict[str, str]:
        """Flat tags naming exactly what a run read: ``lineage.version.<part>`` and ``lineage.view.<modality>``."""
        vers = self.versions()
        return {**{f"lineage.version.{k}": str(v) for k, v in vers.items()},
                "lineage.dataset_table": self.dataset,
                **{f"lineage.view.{m}": v for m, v in self.view_names.items()}}

    def info(self) -> StoreInfo:
        meta, tbl = self.meta, self.table
        counts = {s: tbl.count_rows(filters.eq("split", s)) for s in ("train", "val", "test")}
        present = {m: tbl.count_rows(filters.eq(f"{m}_present", True)) for m in meta.modalities}
        return StoreInfo(name=self.name, dataset=self.dataset, fingerprint=meta.fingerprint,
                         dataset_version=meta.dataset_version, lance_version=meta.versions["dataset"],
                         versions=meta.versions, views=self.view_names, lineage=self.lineage(),
                         rows=tbl.count_rows(), splits=counts, present=present,
                         indices=[i.name for i in tbl.list_indices()], encoders=meta.encoders,
                         missing_counts=self.config_meta.get("missing_counts", {}),
                         updated=self.config_meta.get("updated"))


def open_store(cfg: ExperimentConfig, must_exist: bool = True) -> FeatureStore:
    store = FeatureStore.for_config(cfg)
    if must_exist and not store.exists:
        legacy = store.location.file(f"{legacy_store_name(cfg)}.json")
        if legacy.exists():
            raise StoreError(f"the store under {cfg.store.root} was written by the old one-table-per-encoder-set "
                             f"layout ({legacy.stem}); convert it with `mm store migrate` (no re-encoding) or "
                             "re-extract with `mm extract`")
        raise StoreError(f"no feature store for this config ({store.name} under {cfg.store.root}); "
                         "run `mm extract` with the same data and encoder settings first")
    return store
