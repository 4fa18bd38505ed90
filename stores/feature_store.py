"""LanceDB feature store: one table per (dataset, encoder set), pooled vectors for search and token sequences
for training, plus placeholder features and per-store metadata (fingerprint, dims, counts, lineage)."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lancedb
import numpy as np
import pyarrow as pa
import torch
from filelock import FileLock, Timeout
from lancedb.index import IvfPq

from models.config import ExperimentConfig
from models.heads.base import FeatureBatch, ModalitySpec

from .split_cache import SplitCache

PLACEHOLDER_SUFFIX = "-placeholders"


class StoreError(RuntimeError):
    """The store is missing, locked, corrupt or does not match the config."""


def store_name(cfg: ExperimentConfig) -> str:
    """Table name derived from what determines the features: dataset choice and encoder configs."""
    data = cfg.data.model_dump(mode="json", exclude={"data_dir"})
    for added in ("classes", "name"):  # added after stores existed: unset, they must not rename them
        if data.get(added) is None:
            data.pop(added, None)
    enc = {m: e.model_dump(mode="json", exclude={"batch_size", "device", "precision"}
                           | ({"decode"} if e.decode == "host" else set())  # added later: defaults keep names
                           | ({"embedding_tokens"} if e.embedding_tokens is None else set()))
           for m, e in cfg.encoder_configs().items()}
    key = hashlib.sha256(json.dumps([data, enc], sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset}-{key}"


def fingerprint(dataset_version: str, encoders: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps([dataset_version, encoders], sort_keys=True).encode()).hexdigest()[:16]


def schema_for(modalities: list[str], vec_dim: dict[str, int]) -> pa.Schema:
    """Tokens are stored as raw float16 bytes plus a length: a layout that round-trips in every Lance format
    (nested fixed-size lists do not) and decodes zero-copy into padded numpy arrays."""
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("split", pa.string()),
              pa.field("label", pa.int32()), pa.field("labels", pa.list_(pa.int32())),
              pa.field("source", pa.string()), pa.field("issues", pa.string())]
    for m in modalities:
        fields += [pa.field(f"{m}_present", pa.bool_()), pa.field(f"{m}_vec", pa.list_(pa.float32(), vec_dim[m])),
                   pa.field(f"{m}_tok", pa.binary()), pa.field(f"{m}_ntok", pa.int32()),
                   pa.field(f"{m}_emb", pa.binary()), pa.field(f"{m}_nemb", pa.int32())]
    return pa.schema(fields)


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _tokens(arrays: list[np.ndarray | None]) -> tuple[pa.Array, pa.Array]:
    blobs = [None if a is None else np.ascontiguousarray(a, dtype=np.float16).tobytes() for a in arrays]
    return pa.array(blobs, pa.binary()), pa.array([None if a is None else a.shape[0] for a in arrays], pa.int32())


def decode_tokens(col: pa.ChunkedArray | pa.Array, lengths: np.ndarray, dim: int, pad_to: int,
                  order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary float16 blobs -> padded [N, pad_to, dim] float16 and mask [N, pad_to]. Row ``order[i]`` of the
    column lands at output row i (default: same order); one memcpy per row, no intermediate copies."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    out = np.zeros((n, pad_to, dim), dtype=np.float16)
    mask = np.zeros((n, pad_to), dtype=bool)
    if n == 0:
        return out, mask
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8).view(np.float16)
    starts = offsets[:-1] // (2 * dim)
    counts = np.minimum(np.where(np.diff(offsets) > 0, lengths, 0), pad_to).astype(np.int64)
    rows = np.arange(n) if order is None else order
    if (counts == pad_to).all() and (np.diff(starts) == pad_to).all() and order is None:
        out[:] = data[starts[0] * dim : (starts[0] + n * pad_to) * dim].reshape(n, pad_to, dim)
        mask[:] = True
        return out, mask
    for i, r in enumerate(rows):
        k = counts[r]
        if k:
            out[i, :k] = data[starts[r] * dim : (starts[r] + k) * dim].reshape(k, dim)
            mask[i, :k] = True
    return out, mask


@dataclass
class SplitFeatures:
    ids: list[str]
    batch: FeatureBatch


class FeatureStore:
    """A LanceDB table plus ``<name>.json`` metadata and a ``<name>-placeholders`` table under ``root``."""

    def __init__(self, root: Path, name: str, read_cache: bool = True):
        self.root, self.name = Path(root), name
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(str(self.root))
        self.meta_path = self.root / f"{name}.json"
        self.cache = SplitCache(self.root / f"{name}.cache") if read_cache else None

    def _has(self, table: str) -> bool:
        return table in self.db.list_tables().tables

    # ------------------------------------------------------------------ metadata
    @property
    def exists(self) -> bool:
        return self.meta_path.exists() and self._has(self.name)

    @property
    def meta(self) -> dict:
        if not self.meta_path.exists():
            raise StoreError(f"no feature store {self.name!r} under {self.root}; run `mm extract` with this config")
        return json.loads(self.meta_path.read_text())

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(self.meta_path)  # atomic

    @property
    def table(self):
        if not self._has(self.name):
            raise StoreError(f"feature table {self.name!r} does not exist under {self.root}")
        return self.db.open_table(self.name)

    @property
    def modalities(self) -> list[str]:
        return self.meta["modalities"]

    @contextmanager
    def writer_lock(self, timeout: float) -> Iterator[None]:
        lock = FileLock(str(self.root / f"{self.name}.lock"), timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(f"store {self.name!r} is being written by another process ({lock.lock_file}); "
                             "wait for it to finish or raise store.lock_timeout_s") from None
        try:
            yield
        finally:
            lock.release()

    # ------------------------------------------------------------------ writing
    def create(self, meta: dict) -> None:
        if not self._has(self.name):
            self.db.create_table(self.name, schema=schema_for(meta["modalities"], meta["vec_dim"]))
        self.write_meta(meta)

    def existing_ids(self) -> set[str]:
        tbl = self.table
        n = tbl.count_rows()
        return set(tbl.search().select(["id"]).limit(n).to_arrow()["id"].to_pylist()) if n else set()

    def add_rows(self, rows: list[dict[str, Any]]) -> int:
        """Append rows (one atomic Lance commit). Each row: id, split, label, labels, source, issues and per
        modality ``present``, ``vec``, ``tok``, ``emb``. Returns the new table version."""
        mods, meta = self.modalities, self.meta
        cols: dict[str, Any] = {k: [r[k] for r in rows] for k in ("id", "split", "label", "labels", "source", "issues")}
        for m in mods:
            vecs = np.stack([r[m]["vec"] for r in rows])
            if not np.isfinite(vecs).all():
                bad = [rows[i]["id"] for i in np.flatnonzero(~np.isfinite(vecs).all(1))]
                raise StoreError(f"non-finite {m} vectors for ids {bad[:5]}; nothing from this batch was written")
            cols[f"{m}_present"] = [r[m]["present"] for r in rows]
            cols[f"{m}_vec"] = _fixed(vecs)
            cols[f"{m}_tok"], cols[f"{m}_ntok"] = _tokens([r[m]["tok"] for r in rows])
            cols[f"{m}_emb"], cols[f"{m}_nemb"] = _tokens([r[m].get("emb") for r in rows])
        self.table.add(pa.table(cols, schema=schema_for(mods, meta["vec_dim"])))
        return self.table.version

    def set_placeholders(self, enc: dict[str, dict]) -> None:
        cols = {"modality": list(enc), "vec": [e["vec"].astype(np.float32).tolist() for e in enc.values()]}
        cols["tok"], cols["ntok"] = _tokens([e["tok"] for e in enc.values()])
        cols["emb"], cols["nemb"] = _tokens([e.get("emb") for e in enc.values()])
        self.db.create_table(self.name + PLACEHOLDER_SUFFIX, pa.table(cols), mode="overwrite")

    def build_index(self, min_rows: int) -> list[str]:
        """IVF-PQ cosine index on each pooled vector column once the table is large enough."""
        tbl, built = self.table, []
        n = tbl.count_rows()
        if n < min_rows:
            return built
        for m in self.modalities:
            dim = self.meta["vec_dim"][m]
            sub = next(s for s in (dim // 16, dim // 8, dim // 4, dim // 2, 1) if s and dim % s == 0)
            tbl.create_index(f"{m}_vec", config=IvfPq(distance_type="cosine", num_partitions=max(1, int(np.sqrt(n))),
                                                      num_sub_vectors=sub), replace=True)
            built.append(f"{m}_vec")
        return built

    # ------------------------------------------------------------------ reading
    def spec(self) -> ModalitySpec:
        meta, ph = self.meta, self.placeholders(("vec",))
        return ModalitySpec(meta["modalities"], meta["vec_dim"], meta["tok_dim"], meta["tok_len"],
                            len(meta["classes"]), meta["task"], meta.get("emb_dim", {}), meta.get("emb_len", {}),
                            placeholder_vec={m: v[0] for m, v in ph.vec.items()})

    def _decode(self, t: pa.Table, inputs: tuple[str, ...], y: torch.Tensor, present: torch.Tensor,
                order: np.ndarray) -> FeatureBatch:
        meta = self.meta
        b = FeatureBatch(present, y)
        for m in meta["modalities"]:
            if "vec" in inputs:
                col = t[f"{m}_vec"].combine_chunks()
                b.vec[m] = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)[order])
            for kind, dim, length in (("tok", meta["tok_dim"], meta["tok_len"]), ("emb", meta.get("emb_dim", {}),
                                                                                  meta.get("emb_len", {}))):
                if kind in inputs and m in dim:
                    lengths = t[f"{m}_n{kind}"].fill_null(0).to_numpy()
                    x, mask = decode_tokens(t[f"{m}_{kind}"], lengths, dim[m], length[m], order)
                    getattr(b, kind)[m], getattr(b, f"{kind}_mask")[m] = torch.from_numpy(x), torch.from_numpy(mask)
        return b

    def columns(self, inputs: tuple[str, ...]) -> list[str]:
        cols = ["id", "split", "label", "labels"]
        for m in self.modalities:
            cols.append(f"{m}_present")
            if "vec" in inputs:
                cols.append(f"{m}_vec")
            for kind in ("tok", "emb"):
                if kind in inputs:
                    cols += [f"{m}_{kind}", f"{m}_n{kind}"]
        return cols

    def read_split(self, split: str, inputs: tuple[str, ...] = ("vec",)) -> SplitFeatures:
        """Every row of ``split`` as one FeatureBatch of CPU tensors (ids sorted for determinism). Served from
        the decoded split cache when it holds this table version; otherwise decoded from Lance and cached."""
        tbl, inputs = self.table, tuple(sorted(set(inputs)))
        version = tbl.version
        if self.cache is not None and (hit := self.cache.load(version, split, inputs)) is not None:
            return SplitFeatures(*hit)
        tbl.checkout(version)  # the rows cached are exactly this version's, even if a writer commits meanwhile
        got = self._read_lance(tbl, split, inputs)
        if self.cache is not None:
            try:
                self.cache.save(version, split, inputs, got.ids, got.batch)
            except OSError as e:  # a read-only or full disk costs speed, never the read
                warnings.warn(f"split cache not written ({e}); reads decode from Lance", stacklevel=2)
        return got

    def _read_lance(self, tbl, split: str, inputs: tuple[str, ...]) -> SplitFeatures:
        meta = self.meta
        t = tbl.search().where(f"split = '{split}'").select(self.columns(inputs)).limit(tbl.count_rows()).to_arrow()
        order = pa.compute.sort_indices(t["id"]).to_numpy()  # ids sorted; applied while decoding, no copy
        if meta["task"] == "multilabel":
            y = torch.zeros(t.num_rows, len(meta["classes"]))
            for i, labels in enumerate(t["labels"].take(order).to_pylist()):
                y[i, labels] = 1
        else:
            y = torch.from_numpy(t["label"].to_numpy().astype(np.int64)[order])
        present = torch.from_numpy(np.stack([t[f"{m}_present"].to_numpy(zero_copy_only=False)[order]
                                             for m in meta["modalities"]], 1))
        return SplitFeatures(t["id"].take(order).to_pylist(), self._decode(t, inputs, y, present, order))

    def placeholders(self, inputs: tuple[str, ...] = ("vec", "tok", "emb")) -> FeatureBatch:
        """One-row FeatureBatch per modality's placeholder features (same padding as read_split)."""
        meta = self.meta
        t = self.db.open_table(self.name + PLACEHOLDER_SUFFIX).to_arrow()
        order = {m: i for i, m in enumerate(t["modality"].to_pylist())}
        b = FeatureBatch(torch.zeros(1, len(meta["modalities"]), dtype=torch.bool), torch.zeros(1, dtype=torch.long))
        for m in meta["modalities"]:
            row = t.slice(order[m], 1)
            if "vec" in inputs:
                b.vec[m] = torch.tensor(row["vec"][0].as_py(), dtype=torch.float32)[None]
            for kind, dim, length in (("tok", meta["tok_dim"], meta["tok_len"]),
                                      ("emb", meta.get("emb_dim", {}), meta.get("emb_len", {}))):
                if kind in inputs and m in dim:
                    x, mask = decode_tokens(row[kind], row[f"n{kind}"].fill_null(0).to_numpy(), dim[m], length[m])
                    getattr(b, kind)[m], getattr(b, f"{kind}_mask")[m] = torch.from_numpy(x), torch.from_numpy(mask)
        return b

    # ------------------------------------------------------------------ search & info
    def search(self, vector: np.ndarray, modality: str, k: int = 5, where: str | None = None,
               exact: bool = False, nprobes: int = 20) -> pa.Table:
        """Top-k cosine neighbours; ``where`` is a SQL filter applied before the search. With an IVF-PQ index,
        ``nprobes`` partitions are scanned and 10 x k candidates re-ranked exactly (bench/store_io.py: recall
        vs nprobes); ``exact`` scans every row."""
        q = self.table.search(np.asarray(vector, np.float32), vector_column_name=f"{modality}_vec").metric("cosine")
        if where:
            q = q.where(where, prefilter=True)
        q = q.bypass_vector_index() if exact else q.nprobes(nprobes).refine_factor(10)
        cols = ["id", "split", "label", "source", "_distance"] + [f"{m}_present" for m in self.modalities]
        return q.select(cols).limit(k).to_arrow()

    def vector_of(self, id_: str, modality: str) -> np.ndarray:
        t = self.table.search().where(f"id = '{_quote(id_)}'").select([f"{modality}_vec", f"{modality}_present"]).limit(1).to_arrow()
        if t.num_rows == 0:
            raise StoreError(f"id {id_!r} not in store {self.name}")
        return np.asarray(t[f"{modality}_vec"][0].as_py(), np.float32)

    def info(self) -> dict:
        meta, tbl = self.meta, self.table
        counts = {}
        for split in ("train", "val", "test"):
            counts[split] = tbl.count_rows(f"split = '{split}'")
        present = {m: tbl.count_rows(f"{m}_present") for m in meta["modalities"]}
        return {"name": self.name, "fingerprint": meta["fingerprint"], "dataset_version": meta["dataset_version"],
                "lance_version": tbl.version, "versions": len(tbl.list_versions()), "rows": tbl.count_rows(),
                "splits": counts, "present": present, "indices": [i.name for i in tbl.list_indices()],
                "encoders": meta["encoders"], "missing_counts": meta.get("missing_counts", {}),
                "updated": meta.get("updated")}


def _quote(s: str) -> str:
    return s.replace("'", "''")


def open_store(cfg: ExperimentConfig, must_exist: bool = True) -> FeatureStore:
    store = FeatureStore(cfg.store.root, store_name(cfg), read_cache=cfg.store.read_cache)
    if must_exist and not store.exists:
        raise StoreError(f"no feature store for this config ({store.name} under {cfg.store.root}); "
                         "run `mm extract` with the same data and encoder settings first")
    return store


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
