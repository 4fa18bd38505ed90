"""Store benchmarks (issue 5), each measured side by side in one run, printed as Markdown:
  1. cached training vs re-encoding with the frozen encoders each epoch (MMP, CMPT, SRMM)
  2. store reader (decoded split cache, Lance decode) -> torch vs Parquet vs .npy memmap (full split, random batches)
  3. vector query latency p50/p99 with a filter, with/without the IVF-PQ index, recall@10 by nprobes, the index
     trained with Lance's default 50 k-means iterations and with the store's ``index_kmeans_iterations``

    python bench/store_io.py [--dataset avmnist] [--sizes 100000 1000000] [--encode-sample 64] [--skip train reader query]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stores.config_files import load_config
from models.heads import build_head, parse_head_config
from models.training import TrainConfig, fit
from stores.datasets import load_dataset
from stores.encoders import build_encoder
from models.features import take
from stores.features import filters
from stores.features.feature_store import FeatureStore, decode_tokens, open_store
from stores.features.scenarios import ScenarioReader
from stores.encoders import load_backbones


def cached_vs_reencode(ds_name: str, sample: int) -> str:
    cfg = load_config(f"configs/{ds_name}.yaml")
    store, ds = open_store(cfg), load_dataset(cfg.data)
    train_records = [r for r in ds.records if r.split == "train"]
    epoch_items = sum(r.split in ("train", "val") for r in ds.records)  # an epoch reads train and val
    enc_s = {}
    for m, ecfg in cfg.encoder_configs().items():
        enc = build_encoder(m, ecfg)
        items = [enc.load(ds.raw(m, r.payload[m])) for r in train_records[:sample]]
        enc.encode(items[:4])  # warm up
        t0 = time.perf_counter()
        for i in range(0, len(items), ecfg.batch_size):
            enc.encode(items[i : i + ecfg.batch_size])
        enc_s[m] = (time.perf_counter() - t0) / len(items) * epoch_items
    rows = []
    for name in ("srmm", "mmp", "cmpt"):
        head_cfg = parse_head_config({"name": name})
        run_cfg = cfg.model_copy(update={"head": head_cfg})
        backbones = load_backbones(run_cfg.head, run_cfg.encoder_configs(), store.meta.emb_dim)
        head = build_head(head_cfg, store.spec(), backbones)
        reader = ScenarioReader(store, tuple(head.inputs), seed=0)
        t0 = time.perf_counter()
        reader.split("train")
        read_s = time.perf_counter() - t0
        train, val = reader.under("train", cfg.train_pattern), reader.under("val", cfg.train_pattern)
        res = fit(head, train, val, TrainConfig(epochs=1, device="cpu"), seed=0)
        epoch_s = res.seconds
        reencode = sum(enc_s.values()) + epoch_s
        rows.append(f"| {name} | {read_s:.2f} | {epoch_s:.1f} | {reencode:.1f} | {reencode / epoch_s:.1f}x |")
    enc_txt = ", ".join(f"{m}: {s:.0f} s" for m, s in enc_s.items())
    return (f"### 1. Cached training vs re-encoding each epoch ({ds_name}, {len(train_records)} train items, CPU)\n\n"
            f"An epoch trains on the train split and validates on the val split, so re-encoding covers "
            f"{epoch_items} items per epoch with the frozen encoders (timed on {sample} items, scaled): {enc_txt}.\n\n"
            "| head | store read (s) | epoch from cache (s) | epoch re-encoding (s) | speed-up |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _materialise(batch) -> int:
    """Copy every tensor of a FeatureBatch into RAM the way the memmap baseline does; returns the bytes."""
    return sum(torch.from_numpy(np.array(t.numpy())).nbytes for t in batch.tensors().values())


def reader(ds_name: str) -> str:
    """The same arrays (every tensor ``read_split('train', ('tok',))`` returns) from each reader."""
    cfg = load_config(f"configs/{ds_name}.yaml")
    store = open_store(cfg)
    nocache = FeatureStore(store.root, store.name, read_cache=False)
    split = nocache.read_split("train", ("tok",))
    arrays = {k: t.numpy() for k, t in split.batch.tensors().items()}
    n, nbytes = len(split.ids), sum(a.nbytes for a in arrays.values())
    tmp = Path(tempfile.mkdtemp())
    for k, a in arrays.items():
        np.save(tmp / f"{k}.npy", a)
    pq.write_table(pa.table({k: pa.array([r.tobytes() for r in a.reshape(n, -1)], pa.binary())
                             for k, a in arrays.items()}), tmp / "split.parquet")

    def parquet_decode(t: pa.Table) -> dict:
        out = {}
        for k, a in arrays.items():
            col = t[k].combine_chunks()
            buf = np.frombuffer(col.buffers()[2], a.dtype)
            out[k] = torch.from_numpy(buf[: t.num_rows * a[0].size].reshape((t.num_rows,) + a.shape[1:]).copy())
        return out

    def lance_cold():
        shutil.rmtree(store.cache.root, ignore_errors=True)
        _materialise(store.read_split("train", ("tok",)).batch)

    def lance_cached():
        _materialise(store.read_split("train", ("tok",)).batch)

    def lance_nocache():
        _materialise(nocache.read_split("train", ("tok",)).batch)

    def npy_full():
        for k in arrays:
            torch.from_numpy(np.array(np.load(tmp / f"{k}.npy", mmap_mode="r")))

    def parquet_full():
        parquet_decode(pq.read_table(tmp / "split.parquet"))

    rng = np.random.default_rng(0)
    idx = [np.sort(rng.choice(n, 128, replace=False)) for _ in range(20)]

    def cached_rand():
        b = store.read_split("train", ("tok",)).batch
        for i in idx:
            take(b, torch.from_numpy(i))

    ent, views, meta = store.entity_table(), store.views(), store.meta  # the join a random-access loader does
    keys = ent.search().where(filters.eq("split", "train")).select([f"{m}_key" for m in store.modalities]) \
        .limit(ent.count_rows()).to_arrow()
    tables = {m: v.table() for m, v in views.items()}
    row_ids = {m: views[m].row_ids(tables[m]) for m in store.modalities}
    keys = keys.filter(pa.array([all(k in row_ids[m] for m, k in zip(store.modalities, r.values()))  # extracted
                                 for r in keys.to_pylist()]))

    def lance_take_rand():
        for i in idx:
            for m in store.modalities:
                ids = [row_ids[m][k] for k in keys[f"{m}_key"].take(i).to_pylist()]
                t = tables[m].take_row_ids(ids).select(["tok", "ntok"]).to_arrow()
                decode_tokens(t["tok"], t["ntok"].fill_null(0).to_numpy(), meta.tok_dim[m], meta.tok_len[m])

    def npy_rand():
        mm = {k: np.load(tmp / f"{k}.npy", mmap_mode="r") for k in arrays}
        for i in idx:
            for a in mm.values():
                torch.from_numpy(np.asarray(a[i]))

    def parquet_rand():
        for i in idx:
            parquet_decode(pq.read_table(tmp / "split.parquet").take(i))

    readers = (("store reader, cached split (memory-mapped .npy)", lance_cached, cached_rand),
               ("store reader, first read (Lance decode + cache write)", lance_cold, None),
               ("Lance decode, cache off", lance_nocache, lance_take_rand),
               (".npy memmap (baseline)", npy_full, npy_rand),
               ("Parquet", parquet_full, parquet_rand))
    lance_cached()  # the cache holds this table version from here on
    rows = [(name, _time(full), _time(rand) if rand else None) for name, full, rand in readers]
    base_f, base_r = rows[3][1], rows[3][2]
    lines = [f"| {name} | {n / tf:,.0f} | {nbytes / tf / 1e9:.2f} | {tf / base_f:.2f}x | "
             + (f"{20 * 128 / tr:,.0f} | {tr / base_r:.2f}x |" if tr else "- | - |") for name, tf, tr in rows]
    shutil.rmtree(tmp)
    shapes = ", ".join(f"{k} {tuple(a.shape)} {a.dtype}" for k, a in arrays.items() if k.startswith("tok__"))
    return (f"### 2. Reader: {ds_name} train split, tokens of every modality ({shapes}; {nbytes / 1e6:.0f} MB "
            "with masks and labels) into torch\n\n"
            "| reader | full split rows/s | GB/s | time vs memmap | random 128-row batches rows/s | time vs memmap |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def embedding_like(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Vectors shaped like encoder embeddings: a 512-component mixture on a 32-d latent manifold, projected to
    ``dim`` with a little isotropic noise (real embeddings have low intrinsic dimension)."""
    centers = rng.normal(size=(512, 32))
    z = centers[rng.integers(0, 512, n)] + 0.35 * rng.normal(size=(n, 32))
    proj = rng.normal(size=(32, dim)) / np.sqrt(32)
    return (z @ proj + 0.05 * rng.normal(size=(n, dim))).astype(np.float32)


def queries(sizes: list[int], dim: int = 384, nprobes: tuple[int, ...] = (20, 50, 100)) -> str:
    from lancedb.index import IvfPq
    from models.config import StoreConfig

    iterations = sorted({50, StoreConfig().index_kmeans_iterations}, reverse=True)
    lines = []
    for n in sizes:
        rng = np.random.default_rng(0)
        vecs = embedding_like(n, dim, rng)
        db = lancedb.connect(tempfile.mkdtemp())
        t = pa.table({"id": np.arange(n), "split": np.where(rng.random(n) < 0.2, "test", "train"),
                      "v": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)})
        tbl = db.create_table("q", t)
        qs = vecs[rng.choice(n, 50, replace=False)] + 0.05 * rng.normal(size=(50, dim)).astype(np.float32)

        def run(probes: int | None):
            lat, res = [], []
            for q in qs:
                t0 = time.perf_counter()
                b = tbl.search(q, vector_column_name="v").metric("cosine").where("split = 'test'", prefilter=True)
                b = b.bypass_vector_index() if probes is None else b.nprobes(probes).refine_factor(10)
                out = b.limit(10).select(["id", "_distance"]).to_arrow()
                lat.append(time.perf_counter() - t0)
                res.append(set(out["id"].to_pylist()))
            return np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, res
        p50e, p99e, exact = run(None)
        parts = int(np.sqrt(n))
        for iters in iterations:
            t0 = time.perf_counter()
            tbl.create_index("v", config=IvfPq(distance_type="cosine", num_partitions=parts, num_sub_vectors=dim // 16,
                                               max_iterations=iters), replace=True)
            build = time.perf_counter() - t0
            for probes in nprobes:
                p50a, p99a, approx = run(probes)
                recall = np.mean([len(a & e) / 10 for a, e in zip(approx, exact)])
                lines.append(f"| {n:,} | {iters} | {parts} / {probes} | {p50e:.1f} / {p99e:.1f} | "
                             f"{p50a:.1f} / {p99a:.1f} | {p50e / p50a:.1f}x | {recall:.3f} | {build:.0f} |")
                print(lines[-1], flush=True)
    return ("### 3. Vector query, top-10 cosine with filter `split = 'test'` (20% of rows), 384-d, "
            "embedding-like vectors (`embedding_like`), 50 queries, IVF-PQ with refine factor 10\n\n"
            "| rows | k-means iterations | partitions / nprobes | exact p50 / p99 (ms) | IVF-PQ p50 / p99 (ms) | "
            "p50 speed-up | recall@10 | index build (s) |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines)
            + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="avmnist")
    ap.add_argument("--sizes", nargs="+", type=int, default=[100_000], help="add 1000000 for the 1M table (~6 min)")
    ap.add_argument("--encode-sample", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    torch.manual_seed(0)
    parts = []
    if "train" not in args.skip:
        parts.append(cached_vs_reencode(args.dataset, args.encode_sample))
        print(parts[-1], flush=True)
    if "reader" not in args.skip:
        parts.append(reader(args.dataset))
        print(parts[-1], flush=True)
    if "query" not in args.skip:
        parts.append(queries(args.sizes))
        print(parts[-1], flush=True)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"store_io-{args.dataset}.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
