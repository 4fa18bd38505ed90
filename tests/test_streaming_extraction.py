"""Extraction whose memory does not grow with the source (issue 21): the source streams in record batches, the views'
keys live in a compact index, and the payloads of a Parquet-with-bytes source are never all held at once."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stores.datasets import load_dataset
from stores.datasets.base import StreamedRecords
from stores.extraction import extract
from stores.extraction import key_index
from stores.extraction.key_index import PLANNED, UNKNOWN, KeyIndex
from stores.features.feature_store import FeatureStore
from stores.features.row_diff import IdIndex

from conftest import manifest_config


def test_key_index_answers_membership_and_row_ids_across_merges(monkeypatch):
    keys = [f"{i:032x}" for i in range(50)]
    index = KeyIndex(key_index.digest(keys[:30]), np.arange(30, dtype=np.int64) * 7)
    assert index.contains(keys[:30]).all() and not index.contains(keys[30:]).any()
    assert (index.rowids(keys[:30]) == np.arange(30) * 7).all() and (index.rowids(keys[30:]) == UNKNOWN).all()
    monkeypatch.setattr(key_index, "MERGE_EVERY", 5)  # merge the recent keys into the sorted arrays often
    index.plan(keys[30:50])
    assert index.contains(keys).all() and (index.rowids(keys[30:]) == PLANNED).all()
    index.located(keys[30:40], np.arange(100, 110))  # merged: keys 40-49 stay planned
    assert (index.rowids(keys[30:40]) == np.arange(100, 110)).all()
    assert (index.rowids(keys[40:]) == PLANNED).all() and len(index) == 50
    index.located(keys[40:], np.arange(200, 210))
    assert (index.rowids(keys) == np.r_[np.arange(30) * 7, np.arange(100, 110), np.arange(200, 210)]).all()


def test_id_index_answers_as_pc_index_in_with_absent_ids_repeats_and_hash_collisions():
    rng = np.random.default_rng(0)
    column = pa.chunked_array([[f"id-{i}" for i in rng.integers(0, 400, 300)], [f"id-{i}" for i in range(50)]])
    query = pa.array([f"id-{i}" for i in rng.integers(0, 600, 500)] + ["", "id-7"])

    class Coarse(IdIndex):  # 3 hash values for 350 ids: nearly every lookup is a collision
        CHUNK = 64
        _hash = staticmethod(lambda s: hash(s) % 3)

    expected = pc.index_in(query, value_set=column)
    for index in (IdIndex(column), Coarse(column)):
        got = index.index_in(query)
        assert got.null_count == expected.null_count > 0 and got.equals(expected.cast(pa.int64()))
    assert IdIndex(column).index_in(query.slice(0, 0)).to_pylist() == []
    with_null = pa.array(["a", None, "b", "a"])  # nulls match nulls, as pc.index_in's default
    assert IdIndex(with_null).index_in(pa.array([None, "a", "c"])).to_pylist() == [1, 0, None]


@pytest.fixture(scope="module")
def bulky_source(tmp_path_factory):
    """3,000 rows whose image cells are 24 KB of bytes that are not an image (72 MB of payload in all, stored as
    missing without an encoder pass) and a short text, in 3 Parquet shards."""
    root = tmp_path_factory.mktemp("bulky")
    rng = np.random.default_rng(0)
    for s in range(3):
        n = 1000
        pq.write_table(pa.table({
            "id": [f"r{s}-{i}" for i in range(n)], "split": [["train", "val", "test"][i % 3] for i in range(n)],
            "label": [f"c{i % 2}" for i in range(n)],
            "image": [rng.bytes(24_000) for _ in range(n)], "text": [f"row {s} {i}" for i in range(n)]}),
            root / f"part-{s}.parquet", row_group_size=250)
    return root


def test_a_source_streams_and_extraction_never_holds_its_payloads(bulky_source, tmp_path, tiny_hf):
    cfg = manifest_config(tmp_path, bulky_source, data__name="bulky", store__write_every=256,
                          encoders__image={"kind": "hf", "model": str(tiny_hf["image"])},
                          encoders__text={"kind": "hf", "model": str(tiny_hf["text"])})
    ds = load_dataset(cfg.data)
    assert isinstance(ds.records, StreamedRecords) and len(ds.records) == 3000 and ds.records._all is None
    assert max(len(b) for b in ds.batches()) <= 1024
    tracemalloc.start()
    try:
        report = extract(cfg, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.rows == 3000 and report.missing_counts["image"] and not report.missing_counts["text"]
    # 72 MB of image bytes went through; Python never held more than a batch or two of them at once
    assert peak < 45e6, f"peak of Python allocations {peak / 1e6:.0f} MB"
    store = FeatureStore(cfg.store.root, report.store)
    assert store.table.count_rows() == 3000
    again = extract(cfg, progress=False)  # re-reading the same shards: every input is hashed, none encoded
    assert again.added == 0 and again.skipped == 3000 and sum(again.encoded.values()) == 0


def test_an_extraction_looks_ids_up_in_time_linear_in_the_rows(bulky_source, tmp_path, tiny_hf, monkeypatch):
    """A rerun matches each source batch against the stored dataset and search tables: each table's ids and row
    digests are hashed once, then each source row a constant number of times, not once per batch as with
    pc.index_in's value_set (N^2 / batch). A first extraction has nothing to match."""
    hashed = []
    monkeypatch.setattr(IdIndex, "_hash", staticmethod(lambda s: hashed.append(1) or hash(s)))
    cfg = manifest_config(tmp_path, bulky_source, data__name="bulky", store__write_every=256,
                          encoders__image={"kind": "hf", "model": str(tiny_hf["image"])},
                          encoders__text={"kind": "hf", "model": str(tiny_hf["text"])})
    n_batches = len(list(load_dataset(cfg.data).batches()))
    assert n_batches >= 9  # (24 KB image cells: batches of about 350 rows)
    extract(cfg, progress=False)
    assert len(hashed) == 0  # no stored table: every row is new, nothing is looked up
    extract(cfg, progress=False, use_record=False)  # a rerun that reads the source: nothing to write
    # values hashed per row: the stored dataset table's id, its 9 other columns and the image stat (11), the
    # search table's id and its 6 compared columns (7); each source row's id and columns against both (10 + 7)
    assert len(hashed) == (11 + 7 + 17) * 3000


def test_a_parquet_shard_streams_page_by_page_not_row_group_by_row_group(tmp_path):
    """One row group of 96 MB of image bytes (``pq.write_table``'s default layout up to 1M rows): the reader's
    Arrow memory stays a fraction of it (``pyarrow.dataset`` held 1.9x the row group)."""
    import pyarrow.fs as pafs

    from stores.datasets.readers import BATCH_ROWS, read_parquet
    rng = np.random.default_rng(0)
    n = 12_000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "image": [rng.bytes(8_000) for _ in range(n)],
                             "unused": [rng.bytes(100) for _ in range(n)]}), tmp_path / "one.parquet")
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_row_groups == 1
    base, peak, rows = pa.total_allocated_bytes(), 0, []
    for batch in read_parquet(pafs.LocalFileSystem(), str(tmp_path / "one.parquet"), ["id", "image", "absent"]):
        peak = max(peak, pa.total_allocated_bytes() - base)
        assert batch.schema.names == ["id", "image"] and batch.num_rows <= BATCH_ROWS
        rows += batch["id"].to_pylist()
    assert rows == [f"r{i}" for i in range(n)]
    assert peak < 96e6 / 2, f"{peak / 1e6:.1f} MB of Arrow memory for a 96 MB row group"


def test_lance_metadata_cache_is_bounded_across_many_commits(tmp_path, monkeypatch):
    """A store connection's Lance session caps its metadata cache: 60 commits to a table (an extraction commits
    one per write_every rows, each manifest listing every fragment so far) stay under the cap, where Lance's
    default session grows past it."""
    import lancedb

    from stores.features import location
    monkeypatch.setattr(location, "METADATA_CACHE_BYTES", 256 << 10)
    sessions, real = [], lancedb.Session
    monkeypatch.setattr(location.lancedb, "Session", lambda **kw: sessions.append(real(**kw)) or sessions[-1])

    def commits(db):
        tbl = db.create_table("t", pa.table({"x": np.arange(10)}))
        for i in range(60):
            tbl.add(pa.table({"x": np.arange(10) + i}))
            tbl.count_rows(), tbl.version  # reads the new version's manifest and fragments
        return tbl.count_rows()

    assert commits(location.StoreLocation.of(tmp_path / "capped").connect()) == 610
    assert len(sessions) == 1 and 0 < sessions[0].size_bytes <= 256 << 10
    default = real()
    assert commits(lancedb.connect(tmp_path / "default", session=default)) == 610
    assert default.size_bytes > 256 << 10


def test_a_rerun_never_holds_the_dataset_or_search_table_whole(tmp_path, tiny_hf, monkeypatch):
    """The dataset and search tables hold each row's source (a whole text for a text input): a rerun compares the
    source with them batch by batch through digests, so Arrow never holds a copy of either table (the old diff
    held the stored dataset table, the new one and the search table's columns at once: over 3 copies)."""
    import threading

    rng = np.random.default_rng(0)
    n, width = 2000, 16_000
    words = np.array([f"w{i}" for i in range(1000)])
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "split": ["train", "val", "test", "train"] * (n // 4),
                             "label": [f"c{i % 2}" for i in range(n)],
                             "text": [" ".join(rng.choice(words, width // 4)) for _ in range(n)]}),
                   tmp_path / "long.parquet", row_group_size=100)
    cfg = manifest_config(tmp_path, tmp_path / "long.parquet", modalities=("text",), data__name="long",
                          store__write_every=512, encoders__text={"kind": "hf", "model": str(tiny_hf["text"])})
    assert extract(cfg, progress=False).rows == n
    from stores.datasets import readers
    monkeypatch.setattr(readers, "BATCH_BYTES", 2 << 20)  # small source batches: what is measured is the diff
    text_bytes = n * width  # about 32 MB: less than one copy of the texts (about 40 MB)
    peak, done = [0], threading.Event()

    def sample():
        base = pa.total_allocated_bytes()
        while not done.wait(0.002):
            peak[0] = max(peak[0], pa.total_allocated_bytes() - base)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        again = extract(cfg, progress=False)
    finally:
        done.set()
        sampler.join()
    assert again.added == 0 and again.skipped == n
    assert peak[0] < text_bytes, f"{peak[0] / 1e6:.0f} MB of Arrow memory for {text_bytes / 1e6:.0f} MB of texts"


def test_row_digests_tell_nulls_empties_and_each_column_apart_and_name_the_ids_gone():
    from stores.features.row_diff import RowDigests, row_digests

    old = pa.table({"id": ["a", "b", "c", "d"], "text": ["x", "", None, "y"], "labels": [[1, 2], [], None, [12]]})
    new = pa.table({"id": ["b", "a", "e", "d"], "text": ["", "x", "z", "y"], "labels": [None, [1, 2], [3], [1, 2]]})
    d = row_digests(old, ["text", "labels"])
    assert len(set(d.tolist())) == 4  # "" vs null, [] vs null, [1, 2] vs [12] all differ
    assert (row_digests(old, ["text"]) != row_digests(old, ["labels"])).any()
    state = RowDigests(old.to_batches(max_chunksize=3), {"row": ["text", "labels"], "text": ["text"]})
    pos = state.match(new)
    assert pos.tolist() == [1, 0, -1, 3]
    assert state.differs(new, pos, "row").tolist() == [True, False, True, True]  # b: [] -> null; d: [12] -> [1, 2]
    assert state.differs(new, pos, "text").tolist() == [False, False, True, False]
    assert state.unseen_ids() == ["c"]
