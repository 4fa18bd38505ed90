"""Feature store: schema round trip, placeholders, filters, index, lock and fingerprint guards."""
import json
import threading

import numpy as np
import pytest
import torch

from stores.features import filters
from stores.features.feature_store import MAX_INDEX_DELTAS, FeatureStore, StoreError, decode_tokens
from stores.features.views import tokens


def _tiny_store(root, toks=(), read_cache=True, rng=None, dim=3):
    """A one-modality store written through the same calls extraction uses: a view, the dataset table."""
    from models.config import EncoderConfig
    from stores.features.views import View, write_json
    store = FeatureStore(root, "t", read_cache=read_cache, dataset="d", views={"text": "view-text-t"})
    write_json(store.dataset_meta_path, {"kind": "dataset", "modalities": ["text"],
                                         "history": {"1": {"classes": ["a", "b"], "task": "multiclass"}}})
    View(store.db, root, "view-text-t").create("text", EncoderConfig(kind="minilm"), {"id": "x"},
                                               {"vec": np.zeros(dim, np.float32), "tok": np.ones((2, 6), np.float16)})
    return _add(store, toks, rng or np.random.default_rng(0), dim=dim)


def _add(store, toks, rng, start=0, dim=3):
    rows = [(f"k{start + i}", {"present": True, "vec": rng.normal(size=dim).astype(np.float32), "tok": t})
            for i, t in enumerate(toks)]
    if rows:
        store.views()["text"].add(rows)
    old = list(store.entities().values())
    store.sync_entities(old + [{"id": f"r{start + i}", "split": "train", "label": i % 2, "labels": [i % 2],
                                "source": "{}", "text_key": k, "text_stat": None} for i, (k, _) in enumerate(rows)],
                        ["text"])
    return store, rows


def test_token_blobs_round_trip_through_lance(tmp_path):
    rng = np.random.default_rng(0)
    toks = [rng.normal(size=(n, 6)).astype(np.float16) for n in (1, 4, 7, 2)]
    store, rows = _tiny_store(tmp_path, toks, read_cache=False, rng=rng)
    got = store.read_split("train", ("vec", "tok"))
    assert got.ids == ["r0", "r1", "r2", "r3"]
    for i, t in enumerate(toks):
        assert got.batch.tok_mask["text"][i].sum() == len(t)
        assert np.array_equal(got.batch.tok["text"][i, : len(t)].numpy(), t)
        assert (got.batch.tok["text"][i, len(t):] == 0).all()
        assert np.allclose(got.batch.vec["text"][i].numpy(), rows[i][1]["vec"])
    ph = store.placeholders(("vec", "tok"))
    assert ph.tok["text"].shape == (1, 7, 6) and ph.tok_mask["text"].sum() == 2
    # non-finite vectors are refused and nothing of that batch lands
    view = store.views()["text"]
    n = view.table().count_rows()
    with pytest.raises(StoreError, match="non-finite vectors for keys \\['nan'\\]"):
        view.add([("nan", {"present": True, "vec": np.array([np.nan, 0, 0], np.float32), "tok": toks[0]})])
    assert view.table().count_rows() == n


def test_rows_sharing_an_input_share_one_view_row_and_read_back(tmp_path):
    rng = np.random.default_rng(3)
    store, rows = _tiny_store(tmp_path, [rng.normal(size=(2, 6)).astype(np.float16)], rng=rng)
    store.sync_entities(list(store.entities().values()) + [dict(next(iter(store.entities().values())), id="twin")],
                        ["text"])
    got = store.read_split("train", ("vec", "tok"))
    assert got.ids == ["r0", "twin"] and torch.equal(got.batch.tok["text"][0], got.batch.tok["text"][1])
    assert store.views()["text"].table().count_rows() == 2  # the placeholder row and one shared feature row


def test_split_cache_serves_the_same_tensors_and_follows_table_versions(tmp_path):
    rng = np.random.default_rng(1)
    store, _ = _tiny_store(tmp_path, [rng.normal(size=(n, 6)).astype(np.float16) for n in (3, 5)], rng=rng)
    first, first_versions = store.read_split("train", ("vec", "tok")), store.versions()  # decoded, then cached
    entry = store.cache._dir(first_versions, "train", ("tok", "vec"))
    assert (entry / "manifest.json").exists()
    again = store.read_split("train", ("tok", "vec"))  # same entry whatever the order of inputs
    assert again.ids == first.ids
    for f in ("present", "y"):
        assert torch.equal(getattr(again.batch, f), getattr(first.batch, f))
    for f in ("vec", "tok", "tok_mask"):
        assert torch.equal(getattr(again.batch, f)["text"], getattr(first.batch, f)["text"])
    again.batch.tok["text"][0] = 9  # copy-on-write: writing a served tensor never touches the cache
    assert not (store.read_split("train", ("vec", "tok")).batch.tok["text"][0] == 9).any()
    # a write makes new versions: the next read sees the new rows and drops the superseded entry
    _add(store, [rng.normal(size=(2, 6)).astype(np.float16)], rng, start=2)
    grown = store.read_split("train", ("vec", "tok"))
    assert grown.ids == ["r0", "r1", "r2"] and not entry.parent.exists()
    # a damaged entry is not trusted: the read decodes from Lance and rewrites the entry (``grown`` itself is
    # served from the entry's memory-maps, which the damage overwrites: compare with a copy)
    entry, grown_tok = store.cache._dir(store.versions(), "train", ("tok", "vec")), grown.batch.tok["text"].clone()
    (entry / "tok__text.npy").write_bytes(b"garbage")
    assert torch.equal(store.read_split("train", ("vec", "tok")).batch.tok["text"], grown_tok)
    assert store.cache.load(store.versions(), "train", ("tok", "vec")) is not None
    # pinned at the first versions, the store reads exactly the first rows again (time travel)
    old = store.pin(first_versions).read_split("train", ("vec", "tok"))
    assert old.ids == first.ids and torch.equal(old.batch.tok["text"], first.batch.tok["text"])


def test_decode_tokens_handles_nulls_and_truncation():
    blobs, lengths = tokens([np.ones((3, 2), np.float16), None, np.full((5, 2), 2, np.float16)])
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
    assert info.present == {"image": 33, "text": 35} and info.rows == 36
    assert info.fingerprint == report.fingerprint


def test_query_filters(colour_store):
    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    q = store.vector_of("s010", "text")
    where = filters.all_of(filters.eq("split", "train"), filters.eq("label", 1), filters.eq("image_present", True))
    hits = store.search(q, "text", k=5, where=where).to_pylist()
    assert hits and all(h["split"] == "train" and h["label"] == 1 and h["image_present"] for h in hits)
    # nearest neighbours by text share the class (same colour words)
    top = store.search(q, "text", k=5).to_pylist()
    assert sum(h["label"] == 1 for h in top) >= 4
    with pytest.raises(StoreError, match="not in store"):
        store.vector_of("nope", "text")


def test_ann_index_and_recall(tmp_path):
    rng = np.random.default_rng(0)
    store, _ = _tiny_store(tmp_path, dim=32)
    centers = rng.normal(size=(20, 32))
    vecs = (centers[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))).astype(np.float32)  # clustered
    store.upsert_search([{"id": str(i), "split": "train", "label": 0, "labels": [0], "source": "{}", "issues": None,
                          "text_key": str(i), "text_present": True, "text_vec": v} for i, v in enumerate(vecs)],
                        {"text": 32}, new=True)
    assert store.update_index(5000, 2.0, None) == ([], None)
    assert store.update_index(1000, 2.0, None) == (["text_vec"], 2000)

    def recall(queries):
        got = []
        for q in queries:
            exact = {h["id"] for h in store.search(q, "text", 10, exact=True).to_pylist()}
            approx = {h["id"] for h in store.search(q, "text", 10).to_pylist()}
            got.append(len(exact & approx) / 10)
        return np.mean(got)
    assert recall(vecs[:20]) >= 0.8

    def add(start, n):
        more = (centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, 32))).astype(np.float32)
        store.upsert_search([{"id": str(i), "split": "train", "label": 0, "labels": [0], "source": "{}",
                              "issues": None, "text_key": str(i), "text_present": True, "text_vec": v}
                             for i, v in zip(range(start, start + n), more)], {"text": 32}, new=True)
        return more
    # grown by less than 2x: the new rows join the trained index (nothing left unindexed), no retraining
    more = add(2000, 600)
    assert store.update_index(1000, 2.0, 2000) == (["text_vec"], 2000)
    [index] = store.table.list_indices()
    assert store.table.index_stats(index.name).num_unindexed_rows == 0
    assert recall(more[:20]) >= 0.8
    # ... as a delta index of their own (the trained part is not rewritten), merged once MAX_INDEX_DELTAS gather
    parts = [store.table.index_stats(index.name).num_indices]
    for k in range(MAX_INDEX_DELTAS):
        more = add(2600 + 10 * k, 10)
        assert store.update_index(1000, 2.0, 2000) == (["text_vec"], 2000)
        parts.append(store.table.index_stats(index.name).num_indices)
        assert store.table.index_stats(index.name).num_unindexed_rows == 0
    assert parts == [2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert recall(more) >= 0.8
    # grown 2x since training: trained again on every row
    add(2680, 1400)
    assert store.update_index(1000, 2.0, 2000) == (["text_vec"], 4080)


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
    from stores.config_files import load_config
    from stores.features.feature_store import open_store
    with pytest.raises(StoreError, match="run `mm extract`"):
        open_store(load_config(None, [f"store.root={tmp_path}"]))


def test_store_names_depend_on_encoders_not_on_splits():
    """Split fractions, seed and limit live in the dataset table: changing them names no new store or view."""
    from stores.config_files import load_config
    from stores.features.feature_store import store_name
    from stores.features.views import view_name
    base = load_config("configs/fashion.yaml")
    resplit = load_config("configs/fashion.yaml", ["data.val_fraction=0.2", "data.seed=3", "data.limit=100",
                                                   "encoders.image.precision=bfloat16", "encoders.text.device=cpu"])
    assert store_name(base) == store_name(resplit)
    other_text = load_config("configs/fashion.yaml", ["encoders.text.max_length=32"])
    assert store_name(other_text) != store_name(base)
    assert view_name("image", other_text.encoder_configs()["image"]) == view_name("image", base.encoder_configs()["image"])
    assert view_name("text", other_text.encoder_configs()["text"]) != view_name("text", base.encoder_configs()["text"])


def test_old_layout_store_gives_a_one_line_migration_message(tmp_path):
    from stores.config_files import load_config
    from stores.features.feature_store import legacy_store_name, open_store
    cfg = load_config(None, [f"store.root={tmp_path}"])
    (tmp_path / f"{legacy_store_name(cfg)}.json").write_text(json.dumps({"fingerprint": "x"}))
    with pytest.raises(StoreError, match="old one-table-per-encoder-set layout.*`mm store migrate`"):
        open_store(cfg)
