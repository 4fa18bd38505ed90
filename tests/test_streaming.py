"""Training larger than memory (issue 21): a split is decoded from Lance chunk by chunk into the split cache's
memory-maps, and training/evaluation build each batch from there with the missing pattern applied to the batch
alone, so no step holds a whole split (or a masked copy of one) in memory; same values as the whole-split path."""
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.features import MaskedSplit, apply_presence, take
from models.patterns import MissingPattern, presence_mask
from models.training import batches
from stores.features.feature_store import FeatureStore, decode_tokens
from stores.features.views import ABSENT

MODS, CLASSES = ("image", "text"), 4
TOK = {"image": (64, 128), "text": (16, 64)}  # (max tokens, dim): up to 18 KB of float16 tokens a row


def _write_store(root, n: int, seed: int = 0) -> FeatureStore:
    """A two-modality store written through the calls extraction uses (views, the dataset table): class-centred
    tokens of varying length, an embedding-layer view for text, ~10% of inputs absent from the source, rows
    listed out of id order, two rows sharing one input, and one row whose image is not extracted."""
    from models.config import EncoderConfig
    from stores.features.views import View, write_json
    rng = np.random.default_rng(seed)
    views = {m: f"view-{m}-stream" for m in MODS}
    store = FeatureStore(root, "stream", dataset="streamds", views=views)
    write_json(store.dataset_meta_path, {"kind": "dataset", "modalities": list(MODS), "history": {
        "1": {"classes": [f"c{i}" for i in range(CLASSES)], "task": "multiclass"}}})
    labels = rng.integers(0, CLASSES, n)
    for m in MODS:
        length, dim = TOK[m]
        ph = {"vec": np.zeros(8, np.float32), "tok": np.full((2, dim), 0.5, np.float16)}
        if m == "text":
            ph["emb"] = np.full((3, dim), -0.5, np.float16)
        View(store.db, root, views[m]).create(m, EncoderConfig(kind="minilm"), {"id": m}, ph)
        centres = rng.normal(size=(CLASSES, dim))
        items = []
        for i in range(n):
            tok = (centres[labels[i]] + rng.normal(size=(int(rng.integers(1, length + 1)), dim))).astype(np.float16)
            f = {"present": True, "vec": rng.normal(size=8).astype(np.float32), "tok": tok}
            if m == "text":
                f["emb"] = tok[: max(1, len(tok) // 2)]
            items.append((f"{m}{i}", f))
        for s in range(0, n, 500):
            store.views()[m].add(items[s : s + 500])
    absent = rng.random((n, len(MODS))) < 0.1
    rows = [{"id": f"r{i:05d}", "split": ["train", "train", "val", "test"][i % 4], "label": int(labels[i]),
             "labels": [int(labels[i])], "source": "{}",
             **{f"{m}_key": ABSENT if absent[i, j] else f"{m}{i}" for j, m in enumerate(MODS)},
             **{f"{m}_stat": None for m in MODS}} for i in rng.permutation(n)]
    rows += [dict(rows[0], id="twin", split="val"), dict(rows[1], id="r-unextracted", split="val",
                                                         image_key="never-extracted")]
    store.sync_entities(rows, list(MODS))
    return store


@pytest.fixture(scope="module")
def stream_store(tmp_path_factory):
    return _write_store(tmp_path_factory.mktemp("stream"), 600)


def _fresh(store: FeatureStore, root, read_cache: bool = True) -> FeatureStore:
    """The same tables with the split cache in a new folder (so the next read decodes from Lance)."""
    fresh = FeatureStore(store.root, store.name, read_cache=read_cache, dataset=store.dataset,
                         views=store.view_names)
    if read_cache:
        from stores.features.split_cache import SplitCache
        fresh.cache = SplitCache(root)
    return fresh


def _config(store: FeatureStore, head):
    """A config for ``store``'s dataset (training reads the store it is given; small batches)."""
    from models.config import ExperimentConfig
    return ExperimentConfig.model_validate({
        "data": {"dataset": "manifest", "manifest": str(store.root / "unused.jsonl")},
        "encoders": {"image": {"kind": "efficientnet_lite0"}, "text": {"kind": "minilm"}},
        "store": {"root": str(store.root)}, "head": head.model_dump(), "seed": 0,
        "train_pattern": {"kind": "per_modality", "rates": {"image": 0.3}},
        "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "device": "cpu"}})


def _reference(store: FeatureStore, split: str, inputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The split decoded the plain way, row by row from Python objects (the old reader's logic): the oracle."""
    meta = store.meta
    ent = store.entity_table().search().where(f"split = '{split}'").limit(None).to_arrow().to_pylist()
    view_rows = {m: {r["key"]: r for r in v.table().search().limit(None).to_arrow().to_pylist()}
                 for m, v in store.views().items()}
    ent = sorted((r for r in ent if all(r[f"{m}_key"] in view_rows[m] for m in MODS)), key=lambda r: r["id"])
    out = {"ids": np.array([r["id"] for r in ent]), "y": np.array([r["label"] for r in ent], np.int64),
           "present": np.array([[view_rows[m][r[f"{m}_key"]]["present"] for m in MODS] for r in ent], bool)}
    for m in MODS:
        rows = [view_rows[m][r[f"{m}_key"]] for r in ent]
        if "vec" in inputs:
            out[f"vec__{m}"] = np.array([r["vec"] for r in rows], np.float32)
        for kind in [k for k in ("tok", "emb") if k in inputs and m in getattr(meta, f"{k}_dim")]:
            length, dim = getattr(meta, f"{kind}_len")[m], getattr(meta, f"{kind}_dim")[m]
            x, mask = np.zeros((len(rows), length, dim), np.float16), np.zeros((len(rows), length), bool)
            for i, r in enumerate(rows):
                k = min(r[f"n{kind}"] or 0, length)
                x[i, :k] = np.frombuffer(r[kind], np.float16).reshape(-1, dim)[:k]
                mask[i, :k] = True
            out[f"{kind}__{m}"], out[f"{kind}_mask__{m}"] = x, mask
    return out


class LargestNewTensor(TorchDispatchMode):
    """The bytes of the largest tensor any torch op allocates while active (views of inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def test_token_head_training_reads_no_whole_split(stream_store, tmp_path, monkeypatch):
    """MMP trained (and selected on validation under every robust pattern) from a cold store: the train split's
    token arrays are several MB, yet no numpy/Python allocation (tracemalloc) and no torch tensor comes near
    them: the split is decoded in chunks into memory-maps and masked batch by batch."""
    from models.heads import build_head, parse_head_config
    from models.training import fit
    from runs.train import fit_head
    monkeypatch.setattr(FeatureStore, "chunk_rows", 64, raising=False)  # a split of 300 rows: 5 chunks
    store = _fresh(stream_store, tmp_path / "cache")
    cfg = _config(stream_store, parse_head_config({"name": "mmp", "d_model": 32, "n_heads": 2, "max_tokens": 8,
                                                   "fusion_layers": 1}))
    warm = take(store.read_split("test", ("tok",)).batch, torch.arange(32))  # imports and code paths paid
    fit(build_head(cfg.head, store.spec()), warm, warm, cfg.train.model_copy(update={"epochs": 1}), 0)
    split_bytes = sum(a.nbytes for k, a in _reference(stream_store, "train", ("tok",)).items() if k != "ids")
    assert split_bytes > 5e6
    tracemalloc.start()  # numpy and Python allocations: a cold read (decoded from Lance) and training
    try:
        _, result = fit_head(cfg, store)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list((tmp_path / "cache").rglob("train-tok/tok__image.npy"))  # decoded once, into the cache
    assert peak < split_bytes / 3, (peak, split_bytes)  # (fixed Python objects plus a batch or a chunk)
    with LargestNewTensor() as largest:  # every tensor torch makes: training again, from the cache
        _, again = fit_head(cfg, store)
    assert largest.bytes < split_bytes / 5, (largest.bytes, split_bytes)
    assert again.history == result.history and len(result.history[0]) > 4  # selected on 3 val patterns


def test_masks_per_batch_give_the_batches_of_the_whole_split_masked(stream_store, tmp_path):
    """A seeded pattern applied batch by batch (shuffled, in order, and on a row subset as the oracle head's
    used rows) gives exactly the batches of the old whole-split masking (``apply_presence`` then gather)."""
    from stores.features.scenarios import ScenarioReader
    inputs = ("emb", "tok", "vec")
    reader = ScenarioReader(_fresh(stream_store, tmp_path / "cache"), inputs, seed=3)
    split = reader.split("train")
    pattern = MissingPattern(kind="per_modality", rates={"image": 0.4, "text": 0.3})
    keep = torch.from_numpy(presence_mask(pattern, list(MODS), len(split.ids), "train", 3))
    served = {k: t.clone() for k, t in split.batch.tensors().items()}
    masked = reader.under("train", pattern)
    assert isinstance(masked, MaskedSplit) and torch.equal(masked.keep, keep)
    whole = apply_presence(split.batch, keep, reader.placeholder, list(MODS))
    assert (~whole.present).sum() > 0.3 * whole.present.numel()  # plenty of rows to swap

    def same(a, b):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    used = torch.from_numpy(np.flatnonzero(whole.present[:, 1].numpy()))
    for new, old in ((masked, whole), (take(masked, used), take(whole, used))):
        for gen in (torch.Generator().manual_seed(7), None):
            got = list(batches(new, 50, gen))
            ref = list(batches(old, 50, None if gen is None else torch.Generator().manual_seed(7)))
            assert len(got) == len(ref)
            for a, b in zip(got[:4] + got[-1:], ref[:4] + ref[-1:]):
                same(a.tensors(), b.tensors())
        assert torch.equal(new.y, old.y) and torch.equal(new.present, old.present)
    same(masked.whole().tensors(), whole.tensors())
    # torch's path (a GPU's, or bfloat16 features numpy lacks): the same batches
    bf16 = split.batch.map(lambda t: t.bfloat16() if t.is_floating_point() else t)
    ref = list(batches(apply_presence(bf16, keep, reader.placeholder, list(MODS)), 64, torch.Generator().manual_seed(1)))
    for a, b in zip(batches(MaskedSplit(bf16, keep, reader.placeholder, list(MODS)), 64,
                            torch.Generator().manual_seed(1)), ref):
        same(a.tensors(), b.tensors())
    same(split.batch.tensors(), served)  # the served (memory-mapped) split itself is never written


@pytest.mark.parametrize("chunk_rows", [1, 37, 4096])
def test_streamed_cache_equals_the_plain_decode(stream_store, tmp_path, monkeypatch, chunk_rows):
    """Decoded chunk by chunk into the cache's memory-maps (any chunk size), read back from the cache, or decoded
    into memory: the same ids in order and the same arrays as a plain row-by-row decode."""
    monkeypatch.setattr(FeatureStore, "chunk_rows", chunk_rows, raising=False)
    inputs = ("emb", "tok", "vec")
    for split in ("val", "train") if chunk_rows > 1 else ("val",):
        ref = _reference(stream_store, split, inputs)
        store = _fresh(stream_store, tmp_path / "cache")
        first, again = store.read_split(split, inputs), store.read_split(split, inputs)
        in_memory = _fresh(stream_store, None, read_cache=False).read_split(split, inputs)
        assert ("twin" in first.ids) == (split == "val") and "r-unextracted" not in first.ids
        for got in (first, again, in_memory):
            assert got.ids == ref["ids"].tolist()
            tensors = got.batch.tensors()
            assert sorted(tensors) == sorted(k for k in ref if k != "ids")
            for k, t in tensors.items():
                assert t.numpy().dtype == ref[k].dtype and np.array_equal(t.numpy(), ref[k]), (split, k)
        assert list((tmp_path / "cache").rglob(f"{split}-emb-tok-vec/tok__image.npy"))


def test_decode_tokens_in_any_order_with_repeats_into_given_arrays():
    from stores.features.views import tokens
    blobs, lengths = tokens([np.full((2, 2), 7, np.float16), np.full((3, 2), 1, np.float16), None,
                             np.arange(10, dtype=np.float16).reshape(5, 2)])
    out = np.zeros((4, 4, 2), np.float16), np.zeros((4, 4), bool)
    x, mask = decode_tokens(blobs.slice(1), lengths.slice(1).fill_null(0).to_numpy(), 2, 4, np.array([2, 0, 2, 1]),
                            out=out)  # (a sliced column: its offsets start past the first blob)
    assert x is out[0] and mask.sum(1).tolist() == [4, 3, 4, 0]
    assert np.array_equal(x[0], np.arange(8).reshape(4, 2)) and np.array_equal(x[0], x[2]) and (x[3] == 0).all()
    assert (x[1, :3] == 1).all() and (x[1, 3] == 0).all()


def test_a_cache_that_cannot_be_written_costs_speed_not_the_read(stream_store, tmp_path, monkeypatch):
    from stores.features.split_cache import EntryWriter

    def refuse(self, name, shape, dtype):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(EntryWriter, "_allocate", refuse)
    store = _fresh(stream_store, tmp_path / "cache")
    with pytest.warns(UserWarning, match="split cache not written"):
        got = store.read_split("val", ("vec",))
    assert got.ids == _reference(stream_store, "val", ("vec",))["ids"].tolist()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-written left


def _mapped_kb(folder) -> int:
    """Resident KB of this process's mappings of files under ``folder`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not line.startswith(("Rss", "Pss")):  # a mapping's first line
            inside = len(head) >= 6 and head[5].startswith(str(folder))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux mappings")
def test_a_pass_over_a_memory_mapped_split_leaves_none_of_it_in_the_process(stream_store, tmp_path, monkeypatch):
    """Shuffled batches from the split cache: after each batch, none of the split's memory-mapped pages is
    resident in the process (dropped with MADV_DONTNEED, kept by the OS page cache), so the RSS of an epoch does
    not grow with the split; the batches are those of the split read without release. (A split over
    ``RELEASE_ABOVE_BYTES``: this one is small, so the bound is lowered to 0 here.)"""
    from stores.features import split_cache
    from stores.features.scenarios import ScenarioReader
    monkeypatch.setattr(split_cache, "RELEASE_ABOVE_BYTES", 0)
    store = _fresh(stream_store, tmp_path / "cache")
    reader = ScenarioReader(store, ("tok", "vec"), seed=0)
    masked = reader.under("train", MissingPattern(kind="per_modality", rates={"image": 0.3}))
    assert masked.release is not None
    touched = float(sum(t.float().sum() for t in reader.split("train").batch.tensors().values()))  # all mapped
    assert touched and _mapped_kb(tmp_path / "cache") > 1000
    plain = batches(replace(masked, release=None), 32, torch.Generator().manual_seed(5))
    n = 0
    for got in batches(masked, 32, torch.Generator().manual_seed(5)):
        assert _mapped_kb(tmp_path / "cache") == 0
        ref = next(plain)  # the same batch read without release (which maps its pages again)
        assert all(torch.equal(a, b) for a, b in zip(got.tensors().values(), ref.tensors().values()))
        masked.release()
        n += 1
    assert n == -(-masked.size // 32) > 5


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux mappings")
def test_a_small_split_stays_mapped_through_a_pass(stream_store, tmp_path):
    """Under ``RELEASE_ABOVE_BYTES`` a split's pages are not dropped after every batch (that cost 3.6x the gather
    of a 102k-row vector split): a pass leaves it mapped, at most its own size, and gives the same batches."""
    from stores.features.scenarios import ScenarioReader
    from stores.features.split_cache import RELEASE_ABOVE_BYTES
    store = _fresh(stream_store, tmp_path / "cache")
    reader = ScenarioReader(store, ("tok", "vec"), seed=0)
    reader.split("train")  # the first read writes the cache entry; this one maps it
    masked = reader.under("train", MissingPattern(kind="per_modality", rates={"image": 0.3}))
    size_kb = sum(t.numel() * t.element_size() for t in masked.data.tensors().values()) / 1024
    assert masked.release is None and size_kb * 1024 < RELEASE_ABOVE_BYTES
    n = sum(1 for _ in batches(masked, 32, torch.Generator().manual_seed(5)))
    assert n == -(-masked.size // 32) > 5
    assert 0 < _mapped_kb(tmp_path / "cache") <= size_kb + 64
