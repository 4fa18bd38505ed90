"""Feature store: schema round trip, placeholders, filters, index, lock and fingerprint guards."""
import json
import threading

import numpy as np
import pytest
import torch

from stores.feature_store import FeatureStore, StoreError, decode_tokens, _tokens


def _rows(rng, toks, start=0):
    return [{"id": f"r{start + i}", "split": "train", "label": i % 2, "labels": [i % 2], "source": "{}",
             "issues": None, "text": {"present": True, "vec": rng.normal(size=3).astype(np.float32), "tok": t,
                                      "emb": None}} for i, t in enumerate(toks)]


def _tiny_store(root, read_cache=True):
    store = FeatureStore(root, "t", read_cache=read_cache)
    store.create({"modalities": ["text"], "vec_dim": {"text": 3}, "tok_dim": {"text": 6}, "tok_len": {"text": 7},
                  "classes": ["a", "b"], "task": "multiclass", "fingerprint": "x", "dataset_version": "v",
                  "encoders": {}})
    return store


def test_token_blobs_round_trip_through_lance(tmp_path):
    rng = np.random.default_rng(0)
    toks = [rng.normal(size=(n, 6)).astype(np.float16) for n in (1, 4, 7, 2)]
    store = _tiny_store(tmp_path, read_cache=False)
    rows = _rows(rng, toks)
    store.add_rows(rows)
    store.set_placeholders({"text": {"vec": np.zeros(3, np.float32), "tok": np.ones((2, 6), np.float16), "emb": None}})
    got = store.read_split("train", ("vec", "tok"))
    assert got.ids == ["r0", "r1", "r2", "r3"]
    for i, t in enumerate(toks):
        assert got.batch.tok_mask["text"][i].sum() == len(t)
        assert np.array_equal(got.batch.tok["text"][i, : len(t)].numpy(), t)
        assert (got.batch.tok["text"][i, len(t):] == 0).all()
        assert np.allclose(got.batch.vec["text"][i].numpy(), rows[i]["text"]["vec"])
    ph = store.placeholders(("vec", "tok"))
    assert ph.tok["text"].shape == (1, 7, 6) and ph.tok_mask["text"].sum() == 2
    # non-finite vectors are refused and nothing of that batch lands
    bad = dict(rows[0], id="nan")
    bad["text"] = dict(rows[0]["text"], vec=np.array([np.nan, 0, 0], np.float32))
    with pytest.raises(StoreError, match="non-finite text vectors for ids \\['nan'\\]"):
        store.add_rows([bad])
    assert store.table.count_rows() == 4


def test_split_cache_serves_the_same_tensors_and_follows_table_versions(tmp_path):
    rng = np.random.default_rng(1)
    store = _tiny_store(tmp_path)
    store.add_rows(_rows(rng, [rng.normal(size=(n, 6)).astype(np.float16) for n in (3, 5)]))
    first = store.read_split("train", ("vec", "tok"))  # decoded from Lance, then cached
    entry = store.cache._dir(store.table.version, "train", ("tok", "vec"))
    assert (entry / "manifest.json").exists()
    again = store.read_split("train", ("tok", "vec"))  # same entry whatever the order of inputs
    assert again.ids == first.ids
    for f in ("present", "y"):
        assert torch.equal(getattr(again.batch, f), getattr(first.batch, f))
    for f in ("vec", "tok", "tok_mask"):
        assert torch.equal(getattr(again.batch, f)["text"], getattr(first.batch, f)["text"])
    again.batch.tok["text"][0] = 9  # copy-on-write: writing a served tensor never touches the cache
    assert not (store.read_split("train", ("vec", "tok")).batch.tok["text"][0] == 9).any()
    # a write makes a new table version: the next read sees the new rows and drops the stale entry
    store.add_rows(_rows(rng, [rng.normal(size=(2, 6)).astype(np.float16)], start=2))
    grown = store.read_split("train", ("vec", "tok"))
    assert grown.ids == ["r0", "r1", "r2"] and not entry.parent.exists()
    # a damaged entry is not trusted: the read decodes from Lance and rewrites the entry
    entry = store.cache._dir(store.table.version, "train", ("tok", "vec"))
    (entry / "tok__text.npy").write_bytes(b"garbage")
    assert torch.equal(store.read_split("train", ("vec", "tok")).batch.tok["text"], grown.batch.tok["text"])
    assert store.cache.load(store.table.version, "train", ("tok", "vec")) is not None


def test_decode_tokens_handles_nulls_and_truncation():
    blobs, lengths = _tokens([np.ones((3, 2), np.float16), None, np.full((5, 2), 2, np.float16)])
    x, mask = decode_tokens(blobs, lengths.fill_null(0).to_numpy(), 2, 4)
    assert mask.sum(1).tolist() == [3, 0, 4] and (x[2] == 2).all() and (x[1] == 0).all()


def test_colour_store_contents_and_bad_inputs(colour_store):
    cfg, report = colour_store
    assert report.rows == 36 and report.added == 36
    # truncated + corrupt JPEG and an absent image; an empty text: recorded missing with reasons and counts
    assert report.missing_counts["image"] == {"unreadable image": 2, "absent in source": 1}
    assert report.missing_counts["text"] == {"empty text": 1}
    store = FeatureStore(cfg.store.root, report.store)
    t = store.table.search().where("issues IS NOT NULL").select(["id", "issues"]).limit(100).to_arrow().to_pylist()
    issues = {r["id"]: json.loads(r["issues"]) for r in t}
    assert set(issues) == {"s000", "s001", "s002", "s004"}
    assert issues["s002"] == {"text": "empty text"}
    info = store.info()
    assert info["present"] == {"image": 33, "text": 35} and info["rows"] == 36
    assert info["fingerprint"] == report.fingerprint


def test_query_filters(colour_store):
    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    q = store.vector_of("s010", "text")
    hits = store.search(q, "text", k=5, where="split = 'train' AND label = 1 AND image_present").to_pylist()
    assert hits and all(h["split"] == "train" and h["label"] == 1 and h["image_present"] for h in hits)
    # nearest neighbours by text share the class (same colour words)
    top = store.search(q, "text", k=5).to_pylist()
    assert sum(h["label"] == 1 for h in top) >= 4
    with pytest.raises(StoreError, match="not in store"):
        store.vector_of("nope", "text")


def test_ann_index_and_recall(tmp_path):
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path, "ann")
    meta = {"modalities": ["image"], "vec_dim": {"image": 32}, "tok_dim": {"image": 2}, "tok_len": {"image": 1},
            "classes": ["a"], "task": "multiclass", "fingerprint": "x", "dataset_version": "v", "encoders": {}}
    store.create(meta)
    centers = rng.normal(size=(20, 32))
    vecs = (centers[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))).astype(np.float32)  # clustered
    store.add_rows([{"id": str(i), "split": "train", "label": 0, "labels": [0], "source": "{}", "issues": None,
                     "image": {"present": True, "vec": v, "tok": np.zeros((1, 2), np.float16), "emb": None}}
                    for i, v in enumerate(vecs)])
    assert store.build_index(min_rows=5000) == []
    assert store.build_index(min_rows=1000) == ["image_vec"]
    recall = []
    for qi in range(20):
        exact = {h["id"] for h in store.search(vecs[qi], "image", 10, exact=True).to_pylist()}
        approx = {h["id"] for h in store.search(vecs[qi], "image", 10).to_pylist()}
        recall.append(len(exact & approx) / 10)
    assert np.mean(recall) >= 0.8


def test_second_writer_gets_clear_error(tmp_path):
    store = FeatureStore(tmp_path, "locked")
    entered, release = threading.Event(), threading.Event()

    def hold():
        with store.writer_lock(0):
            entered.set()
            release.wait(10)
    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    try:
        with pytest.raises(StoreError, match="being written by another process"):
            with FeatureStore(tmp_path, "locked").writer_lock(0.2):
                pass
    finally:
        release.set()
        t.join()
    with store.writer_lock(0):  # free again
        pass


def test_missing_store_is_a_clear_error(tmp_path):
    from models.config import load_config
    from stores.feature_store import open_store
    with pytest.raises(StoreError, match="run `mm extract`"):
        open_store(load_config(None, [f"store.root={tmp_path}"]))


def test_store_names_of_the_shipped_configs_are_stable():
    """Adding an optional config field must not rename existing stores (users would have to re-extract)."""
    from models.config import load_config
    from stores.feature_store import store_name
    assert store_name(load_config("configs/avmnist.yaml")) == "avmnist-610a8e769c"
    assert store_name(load_config("configs/fashion.yaml", ["encoders.image.precision=bfloat16",
                                                           "encoders.text.device=cpu"])) == "fashion-2d447ed0c6"
