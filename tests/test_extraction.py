"""Extraction: resume after interruption (incl. SIGKILL), fingerprint guard, bad audio, masks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_manifest, manifest_config
from stores.extraction import extract
from stores.features.feature_store import FeatureStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


def ids_of(store: FeatureStore) -> list[str]:
    return sorted(store.table.search().select(["id"]).limit(10_000).to_arrow()["id"].to_pylist())


def test_incremental_run_resumes_without_duplicates_compacted_with_pinned_versions_kept(tmp_path, colour_store):
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw"), store__write_every=2,
                          store__version_grace_s=0)
    first = extract(cfg, progress=False, max_rows=10)  # "crash" after 10 rows (5 commits of 2)
    assert first.added == 10 and first.rows == 10
    pinned = FeatureStore(cfg.store.root, first.store).pin(first.versions).read_split("train", ("vec",))
    second = extract(cfg, progress=False)  # 13 more commits per table, then compacted
    assert second.skipped == 10 and second.added == 26 and second.rows == 36
    store = FeatureStore(cfg.store.root, second.store)
    ids = ids_of(store)
    assert len(ids) == len(set(ids)) == 36
    for name in [store.dataset, *store.view_names.values(), store.name]:
        fragments = store.db.open_table(name).stats()["fragment_stats"]["num_fragments"]
        assert fragments <= cfg.store.max_fragments, (name, fragments)
        # the 13 commits in between are gone; each run's final version stays, tagged (and the latest)
        tbl = store.db.open_table(name)
        finals = {t["version"] for tag, t in tbl.tags.list().items() if tag.startswith("extract-v")}
        part = {store.dataset: "dataset", **{v: m for m, v in store.view_names.items()}}.get(name)
        assert part is None or first.versions[part] in finals, (name, first.versions, finals)
        assert len(tbl.list_versions()) <= 3 and tbl.version in finals, (name, tbl.list_versions())
    # what a run read before is still there, row for row (compaction writes a new version, deletes none)
    again = FeatureStore(cfg.store.root, first.store).pin(first.versions).read_split("train", ("vec",))
    assert again.ids == pinned.ids and np.array_equal(again.batch.vec["image"], pinned.batch.vec["image"])
    assert extract(cfg, progress=False).added == 0
    # same features as the uninterrupted extraction of the same data
    ref_cfg, ref = colour_store
    ref_store = FeatureStore(ref_cfg.store.root, ref.store)
    a, b = store.read_split("train", ("vec",)), ref_store.read_split("train", ("vec",))
    assert a.ids == b.ids and np.allclose(a.batch.vec["text"], b.batch.vec["text"], atol=1e-5)


def test_sigkill_mid_extraction_then_rerun(tmp_path):
    manifest = make_manifest(tmp_path / "raw", n=60, bad=False)
    cfg = manifest_config(tmp_path, manifest, modalities=("image", "text"))
    cfg_file = tmp_path / "cfg.yaml"
    import yaml
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    code = ("import sys; from stores.config_files import load_config; from stores.extraction import extract; "
            "extract(load_config(sys.argv[1]), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_file)], cwd=ROOT, start_new_session=True)
    store = FeatureStore.for_config(cfg)
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once some, but not all, rows have landed
        try:
            n = store.table.count_rows()
        except Exception:
            n = 0
        if 0 < n < 60:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = store.table.count_rows()
    assert 0 < partial < 60
    report = extract(cfg, progress=False)
    assert report.rows == 60 and report.skipped == partial
    ids = ids_of(store)
    assert len(ids) == len(set(ids)) == 60


def test_changed_encoder_weights_do_not_mix_into_an_existing_view(tmp_path, tiny_hf):
    """Same encoder config, different weights in the model folder: the view refuses instead of mixing."""
    import shutil
    model = shutil.copytree(tiny_hf["text"], tmp_path / "bert")
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=6, bad=False))
    cfg = cfg.model_copy(update={"encoders": {**cfg.encoders, "text": cfg.encoders["text"].model_copy(
        update={"kind": "hf", "model": str(model)})}})
    extract(cfg, progress=False)
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "layer_norm_eps": 1e-6}))
    with pytest.raises(StoreError, match="weights changed"):
        extract(cfg, progress=False)


def test_audio_bad_inputs_and_three_modalities(tmp_path):
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=15, audio=True),
                          modalities=("image", "text", "audio"))
    report = extract(cfg, progress=False)
    assert report.rows == 15
    rate = "sample rate 100 Hz is below the 4000 Hz minimum (wrong rate in the header?)"
    assert report.missing_counts["audio"] in ({"empty audio (0 samples)": 1, rate: 1},
                                              {"unreadable audio": 1, rate: 1})
    store = FeatureStore(cfg.store.root, report.store)
    assert store.modalities == ["image", "text", "audio"]
    assert store.meta.tok_dim["audio"] == 384


def test_mask_table_is_saved_and_reused(colour_store):
    from models.patterns import MissingPattern
    from stores.features.masks import MaskStore
    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    masks = MaskStore(store)
    ids = store.read_split("train").ids
    p = MissingPattern(kind="per_modality", rates={"image": 0.5})
    a = masks.get("train", ids, p, seed=3)
    b = masks.get("train", list(reversed(ids)), p, seed=3)
    assert np.array_equal(a, b[::-1])
    t = masks.table(seed=3)  # seed 3 is this test's own; other tests share the session store
    assert set(t.column_names) >= {"dataset_version", "split", "pattern", "seed", "id", "image_present"}
    assert t.num_rows == len(ids)  # reused, not re-added


def test_map_chunks_keeps_order_with_one_task_per_chunk():
    """The dataset rows of a batch are built in a few chunks on the pool, in order, whatever the batch size."""
    from concurrent.futures import ThreadPoolExecutor

    from stores.extraction.entities import map_chunks

    with ThreadPoolExecutor(2) as pool:
        for n in (0, 1, 2, 3, 7, 100):
            submitted = []
            real = pool.submit
            pool.submit = lambda *a, **k: submitted.append(1) or real(*a, **k)  # count the pool's tasks
            assert map_chunks(pool, lambda x: x * x, list(range(n)), parts=2) == [x * x for x in range(n)]
            pool.submit = real
            assert len(submitted) == min(n, 2)
