"""Feature views (issue 11): per-modality encoder switches, split/label changes, new/changed/removed rows,
shared inputs across datasets, time travel, exact reproduction from MLflow, gc of pinned versions, quoting."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_manifest, manifest_config
from stores.features import filters
from stores.extraction import extract
from stores.features.feature_store import StoreError, open_store


def _rows(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _write(manifest, rows):
    manifest.write_text("\n".join(json.dumps(r) for r in rows))


@pytest.fixture()
def small(tmp_path):
    """12 clean rows, extracted once (image: EfficientNet-Lite0, text: MiniLM)."""
    manifest = make_manifest(tmp_path / "raw", n=12, bad=False)
    cfg = manifest_config(tmp_path, manifest, store__write_every=4)
    first = extract(cfg, progress=False)
    assert first.encoded == {"image": 12, "text": 3}  # three distinct colour texts: one view row each
    assert first.encoder_load_s > 0  # building both encoders, reported apart from the per-row cost
    return cfg, manifest, first


def test_switching_the_text_encoder_extracts_only_text(small, tiny_hf):
    cfg, _, first = small
    image_view = open_store(cfg).views()["image"]
    image_version = image_view.version
    bert = cfg.model_copy(update={"encoders": {**cfg.encoders, "text": cfg.encoders["text"].model_copy(
        update={"kind": "hf", "model": str(tiny_hf["text"])})}})
    report = extract(bert, progress=False)
    assert report.encoded == {"image": 0, "text": 3} and report.rows == 12 and report.added == 12
    assert image_view.version == image_version  # the image view was not written
    a, b = open_store(cfg), open_store(bert)
    assert a.views()["image"].name == b.views()["image"].name and a.name != b.name
    assert b.meta.tok_dim["text"] == 32 and a.meta.tok_dim["text"] == 384
    assert b.read_split("train", ("vec",)).ids == a.read_split("train", ("vec",)).ids
    # both configs keep working side by side; rerunning either encodes nothing, and builds no encoder
    again = extract(cfg, progress=False)
    assert again.encoded == {"image": 0, "text": 0} and again.encoder_load_s == 0


def test_split_and_label_changes_extract_nothing(small):
    cfg, manifest, _ = small
    rows = _rows(manifest)
    before = {r["id"] for r in rows if r["split"] == "test"}
    moved = sum(r["split"] != "test" for r in rows[:4])
    for r in rows[:4]:
        r["split"] = "test"
    rows[5]["label"] = "class0" if rows[5]["label"] != "class0" else "class1"
    _write(manifest, rows)
    report = extract(cfg, progress=False)
    assert report.encoded == {"image": 0, "text": 0} and report.updated == moved + 1 and report.added == 0
    store = open_store(cfg)
    assert set(store.read_split("test").ids) == before | {r["id"] for r in rows[:4]}
    assert store.table.count_rows(filters.eq("split", "test")) == len(before | {r["id"] for r in rows[:4]})


def test_new_changed_and_removed_rows(small, tmp_path):
    cfg, manifest, first = small
    store = open_store(cfg)
    old_versions = store.versions()
    rows = _rows(manifest)
    gone = rows.pop(1)["id"]  # removed from the source
    img = np.full((32, 32, 3), 128, np.uint8)
    Image.fromarray(img).save(manifest.parent / "new.jpg")
    rows.append({"id": "s100", "split": "train", "label": "class1", "image": "new.jpg", "text": "leafy green grass"})
    changed = rows[2]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(manifest.parent / changed["image"])  # new content
    _write(manifest, rows)
    report = extract(cfg, progress=False)
    # the new row's image and the changed file; the new row's text is already in the text view
    assert report.encoded == {"image": 2, "text": 0}
    assert (report.added, report.updated, report.removed, report.rows) == (1, 1, 1, 12)
    store = open_store(cfg)
    ids = {i for s in ("train", "val", "test") for i in store.read_split(s).ids}
    assert gone not in ids and "s100" in ids and changed["id"] in ids
    # the removed row stays in history: pinned at the old versions it is read again
    old = store.pin(old_versions)
    assert gone in {i for s in ("train", "val", "test") for i in old.read_split(s).ids}
    new_vec = store.read_split(changed["split"]).batch.vec["image"][store.read_split(changed["split"]).ids.index(changed["id"])]
    old_vec = old.read_split(changed["split"]).batch.vec["image"][old.read_split(changed["split"]).ids.index(changed["id"])]
    assert not np.allclose(new_vec.numpy(), old_vec.numpy())  # re-extracted from the new bytes


def test_two_datasets_sharing_files_share_view_rows(small, tmp_path):
    cfg, manifest, _ = small
    other = tmp_path / "raw" / "other.jsonl"
    rows = _rows(manifest)[:6]
    for r in rows:
        r["id"] = "copy-" + r["id"]
    _write(other, rows)
    cfg2 = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": other})})
    report = extract(cfg2, progress=False)
    assert report.encoded == {"image": 0, "text": 0} and report.rows == 6
    assert open_store(cfg2).dataset == "other" and open_store(cfg).dataset == "manifest"


def test_ids_with_quotes_and_an_injected_split_filter(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "raw", n=9, bad=False)
    rows = _rows(manifest)
    rows[0]["id"] = "o'brien"
    _write(manifest, rows)
    cfg = manifest_config(tmp_path, manifest)
    extract(cfg, progress=False)
    store = open_store(cfg)
    vec = store.vector_of("o'brien", "text")
    hits = store.search(vec, "text", k=20, where=filters.ne("id", "o'brien")).to_pylist()
    assert len(hits) == 8 and "o'brien" not in {h["id"] for h in hits}
    from models.patterns import MissingPattern
    from stores.features.masks import MaskStore
    split = next(s for s in ("train", "val", "test") if "o'brien" in store.read_split(s).ids)
    ids = store.read_split(split).ids
    assert MaskStore(store).get(split, ids, MissingPattern(kind="per_modality", rates={"image": 0.5}), 0).shape == \
        (len(ids), 2)
    from flows.cli import main
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as e:  # not a split: refused before any query (the quoting is tested above)
        main(["query", "--json", "-c", str(path), "--id", "o'brien", "--modality", "text", "-k", "20", "--exact",
              "--split", "test' OR '1'='1"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    main(["query", "--json", "-c", str(path), "--id", "o'brien", "--modality", "text", "-k", "20", "--exact",
          "--split", "test"])
    got = json.loads(capsys.readouterr().out)["neighbours"]
    assert got and {r["split"] for r in got} == {"test"}


# ---------------------------------------------------------------------- reproduce and gc (MLflow registry)
# heads logged once and reproduced; the LoRA oracle runs MiniLM's blocks on the text modality alone
REPRODUCED = {"early": {"name": "early"}, "srmm": {"name": "srmm"}, "mmp": {"name": "mmp"}, "cmpt": {"name": "cmpt"},
              "oracle-text-lora": {"name": "oracle", "modality": "text", "backbone": "encoder+lora"},
              "mmp-lora": {"name": "mmp", "backbone": "encoder+lora"}}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A small store and one registered run per head family, logged to a real MLflow (sqlite)."""
    from models.heads import parse_head_config
    from runs.train import train_and_evaluate
    from stores.tracking.runs import Tracker
    tmp = tmp_path_factory.mktemp("repro")
    manifest = make_manifest(tmp / "raw", n=24, bad=False)
    cfg = manifest_config(tmp, manifest, train__epochs=2)
    extract(cfg, progress=False)
    tracker = Tracker(cfg.tracking, "colours")
    runs = {}
    for head, raw in REPRODUCED.items():
        c = cfg.model_copy(update={"head": parse_head_config(raw)})
        result = train_and_evaluate(c)
        runs[head] = (tracker.log_run(result), result.store.versions)
    # the store moves on after the runs: new rows, so the latest versions differ from the logged ones
    rows = _rows(manifest)
    rows += [dict(r, id=f"late{i}") for i, r in enumerate(rows[:6])]
    _write(manifest, rows)
    extract(cfg, progress=False)
    return cfg, runs


@pytest.mark.parametrize("head", list(REPRODUCED))
def test_reproduce_matches_the_original_metrics_exactly(logged, head, tmp_path, capsys):
    from flows.cli import main
    cfg, runs = logged
    run_id, versions = runs[head]
    assert open_store(cfg).versions()["dataset"] > versions["dataset"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    main(["reproduce", "--json", run_id, "-c", str(path)])
    out = json.loads(capsys.readouterr().out)
    assert out["versions"] == versions
    assert out["identical"], [r for r in out["metrics"] if not r["equal"]]
    assert any(r["metric"] == "summary/grid_mean_acc" for r in out["metrics"])


def test_gc_never_removes_a_pinned_version_unless_forced(logged):
    from stores.features.admin import gc, overview
    from stores.tracking.lineage import pinned_store_versions
    cfg, runs = logged
    pinned = pinned_store_versions(cfg.tracking)
    assert {p["run_id"] for p in pinned} == {r for r, _ in runs.values()}
    versions = runs["early"][1]
    table = open_store(cfg).entity_table()
    import pyarrow as pa
    table.add_columns(pa.field("scratch", pa.string()))  # two untagged versions after the pinned one
    table.drop_columns(["scratch"])
    between = {table.version - 1, table.version}
    report = gc(cfg.store.root, pinned, older_than_s=0)
    store = open_store(cfg)
    assert report["tables"][store.name]["removed"]  # the search table is not pinned: its old versions went
    kept_pins = report["tables"][store.dataset]["pinned"]
    assert not set(report["tables"][store.dataset]["removed"]) & set(kept_pins)
    # only the pinned versions, the last extraction's (tagged) and the latest stay: versions after a pin go too
    assert between <= set(report["tables"][store.dataset]["removed"])
    table = store.db.open_table(store.dataset)
    tagged = {int(t["version"]) for t in table.tags.list().values()}
    assert {v["version"] for v in table.list_versions()} <= tagged | {table.version}
    assert versions["dataset"] in report["tables"][store.dataset]["pinned"]
    pinned_read = store.pin(versions).read_split("train")  # the pinned versions still read
    assert pinned_read.ids
    info = overview(cfg.store.root)["tables"]
    assert versions["dataset"] in info[store.dataset]["pinned"]
    assert store.name in info[store.views()["text"].name]["used_by"]
    gc(cfg.store.root, pinned, force=True, older_than_s=0)
    with pytest.raises(StoreError, match="not available"):
        store.pin(versions).entity_table()


def test_migrate_an_old_layout_store_without_reencoding(tmp_path):
    """A store in the old layout (one table per encoder set + .json) becomes views; nothing is encoded again."""
    import lancedb
    import pyarrow as pa
    from stores.features.feature_store import legacy_store_name
    from stores.extraction.migrate import migrate_legacy
    from stores.features.views import fixed, tokens
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=6, bad=False))
    extract(cfg, progress=False)
    store = open_store(cfg)
    meta, splits = store.meta, {s: store.read_split(s, ("vec", "tok", "emb")) for s in ("train", "val", "test")}
    ph = store.placeholders()
    legacy_root = tmp_path / "legacy"
    db, name = lancedb.connect(str(legacy_root)), legacy_store_name(cfg)
    cols: dict = {"id": [], "split": [], "label": [], "labels": [], "source": [], "issues": []}
    per = {m: {"present": [], "vec": [], "tok": [], "emb": []} for m in meta.modalities}
    for s, got in splits.items():
        for i, id_ in enumerate(got.ids):
            cols["id"].append(id_), cols["split"].append(s), cols["source"].append("{}"), cols["issues"].append(None)
            cols["label"].append(int(got.batch.y[i])), cols["labels"].append([int(got.batch.y[i])])
            for j, m in enumerate(meta.modalities):
                per[m]["present"].append(bool(got.batch.present[i, j]))
                per[m]["vec"].append(got.batch.vec[m][i].numpy())
                for k in ("tok", "emb"):
                    if m in getattr(got.batch, k):
                        n = int(getattr(got.batch, f"{k}_mask")[m][i].sum())
                        per[m][k].append(getattr(got.batch, k)[m][i, :n].numpy())
                    else:
                        per[m][k].append(None)
    for m, p in per.items():
        cols[f"{m}_present"], cols[f"{m}_vec"] = p["present"], fixed(np.stack(p["vec"]))
        cols[f"{m}_tok"], cols[f"{m}_ntok"] = tokens(p["tok"])
        cols[f"{m}_emb"], cols[f"{m}_nemb"] = tokens(p["emb"])
    db.create_table(name, pa.table(cols))
    phc = {"modality": meta.modalities, "vec": [ph.vec[m][0].tolist() for m in meta.modalities]}
    phc["tok"], phc["ntok"] = tokens([ph.tok[m][0, : int(ph.tok_mask[m][0].sum())].numpy() for m in meta.modalities])
    phc["emb"], phc["nemb"] = tokens([ph.emb[m][0, : int(ph.emb_mask[m][0].sum())].numpy() if m in ph.emb else None
                                      for m in meta.modalities])
    db.create_table(name + "-placeholders", pa.table(phc))
    (legacy_root / f"{name}.json").write_text(json.dumps({"fingerprint": "old", "modalities": meta.modalities,
                                                          "encoders": meta.encoders}))
    moved = cfg.model_copy(update={"store": cfg.store.model_copy(update={"root": legacy_root})})
    with pytest.raises(StoreError, match="mm store migrate"):
        open_store(moved)
    out = migrate_legacy(moved)
    assert out["copied"] == {"image": 6, "text": 3}
    assert extract(moved, progress=False).encoded == {"image": 0, "text": 0}  # the views already hold everything
    new = open_store(moved).read_split("train", ("vec", "tok"))
    assert new.ids == splits["train"].ids
    assert np.allclose(new.batch.vec["image"].numpy(), splits["train"].batch.vec["image"].numpy())
    assert torch_equal(new.batch.tok["text"], splits["train"].batch.tok["text"])


def torch_equal(a, b) -> bool:
    import torch
    return bool(torch.equal(a, b))
