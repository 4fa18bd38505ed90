"""Users' sharded sources (#21) on the real components (pyarrow, LanceDB, a loopback S3 server, tiny random-init
encoders): Parquet with image bytes, Hugging Face {bytes, path} structs, WebDataset tars, a save_to_disk folder and
an s3:// shard each extract the features the same items give as files through a CSV manifest; a corrupt image inside
a shard is missing with the reason a corrupt file gets; re-ingesting a shard encodes nothing; a shard that cannot be
read is one line naming it."""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import COLORS, WORDS, manifest_config
from models.config import DataConfig
from stores.datasets import DatasetError, load_dataset
from stores.datasets.sources import iter_batches

N = 18  # good items; one corrupt image ("bad") rides along in every source
SPLITS = ["train", "train", "val", "test"]
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> dict:
    """N colour squares (PNG bytes) with texts and labels, plus one corrupt image, as files + a CSV manifest."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("sources")
    raw = root / "files"
    raw.mkdir()
    rows = []
    for i in range(N):
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.array(COLORS[i % 3]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                        ).save(buf, format="PNG")
        rows.append({"id": f"s{i:03d}", "split": SPLITS[i % 4], "label": f"class{i % 3}", "text": WORDS[i % 3],
                     "data": buf.getvalue()})
    rows.append({"id": "bad", "split": "train", "label": "class0", "text": WORDS[0], "data": b"not an image at all"})
    for r in rows:
        (raw / f"{r['id']}.png").write_bytes(r["data"])
    with open(raw / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "label", "image", "text"])
        w.writerows([r["id"], r["split"], r["label"], f"{r['id']}.png", r["text"]] for r in rows)
    return {"root": root, "rows": rows, "csv": raw / "items.csv"}


def table(rows: list[dict], cell=lambda r: r["data"], **names) -> pa.Table:
    n = {k: names.get(k, k) for k in ("id", "split", "label", "text", "image")}
    return pa.table({n["id"]: [r["id"] for r in rows], n["split"]: [r["split"] for r in rows],
                     n["label"]: [r["label"] for r in rows], n["text"]: [r["text"] for r in rows],
                     n["image"]: [cell(r) for r in rows]})


def write_parquet_shards(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    half = len(rows) // 2
    pq.write_table(table(rows[:half]), folder / "part-00000.parquet")
    pq.write_table(table(rows[half:]), folder / "part-00001.parquet")
    (folder / "_SUCCESS").write_text("")  # what Spark leaves: not a shard
    return folder


def write_webdataset(folder: Path, rows: list[dict]) -> Path:
    """One .tar per split under train/ val/ test/; half the labels in .cls, half in a .json field."""
    for split in ("train", "val", "test"):
        (folder / split).mkdir(parents=True)
        with tarfile.open(folder / split / "000000.tar", "w") as tar:
            for i, r in enumerate(x for x in rows if x["split"] == split):
                parts = {"png": r["data"], "txt": r["text"].encode()}
                label = {"cls": r["label"].encode()} if i % 2 else {"json": json.dumps({"label": r["label"]}).encode()}
                parts.update(label)
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{r['id']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def write_hf_dataset_dict(folder: Path, rows: list[dict]) -> tuple[Path, dict[str, str]]:
    """What ``DatasetDict.save_to_disk`` writes (Arrow IPC streams, state.json, dataset_info.json,
    dataset_dict.json): columns img (Image), caption, label (ClassLabel); no id, so ids are <split>-<row>."""
    features = {"img": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"},
                "label": {"names": ["class0", "class1", "class2"], "_type": "ClassLabel"}}
    ids = {}
    for split, name in HF_SPLITS.items():
        part = [r for r in rows if r["split"] == split]
        ids.update({f"{split}-{i}": r["id"] for i, r in enumerate(part)})
        t = pa.table({"img": pa.array([{"bytes": r["data"], "path": f"{r['id']}.png"} for r in part]),
                      "caption": [r["text"] for r in part], "label": pa.array([int(r["label"][-1]) for r in part],
                                                                                pa.int64())})
        t = t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        (folder / name).mkdir(parents=True)
        with pa.ipc.new_stream(folder / name / "data-00000-of-00001.arrow", t.schema) as w:
            w.write_table(t, max_chunksize=4)
        (folder / name / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_format_columns": None,
            "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": name}))
        (folder / name / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(HF_SPLITS.values())}))
    return folder, ids


@pytest.fixture(scope="module")
def s3_source(items):
    """A moto S3 server on loopback holding the Parquet shards under s3://shards/colours/; AWS_ENDPOINT_URL and
    the credentials point pyarrow at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = "http://{}:{}".format(*server.get_host_and_port())
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="shards")
    local = write_parquet_shards(items["root"] / "for-s3", items["rows"])
    for shard in sorted(local.glob("*.parquet")):
        client.upload_file(str(shard), "shards", f"colours/{shard.name}")
    yield "s3://shards/colours/*.parquet"
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def tiny_config(root: Path, manifest, tiny_hf, **over):
    return manifest_config(root, manifest, encoders__image={"kind": "hf", "model": str(tiny_hf["image"]),
                                                            "image_size": 32, "batch_size": 16},
                           encoders__text={"kind": "hf", "model": str(tiny_hf["text"])}, **over)


def features(cfg) -> dict[str, dict]:
    from stores.features.feature_store import FeatureStore
    t = FeatureStore.for_config(cfg).table.search().select(
        ["id", "split", "label", "image_vec", "text_vec", "issues"]).limit(1000).to_arrow().to_pylist()
    return {r["id"]: r for r in t}


@pytest.fixture(scope="module")
def extracted(items, tiny_hf, s3_source) -> dict:
    """Each source extracted into its own store: name -> (config, report, {file id: search row})."""
    from stores.extraction import extract
    root, rows = items["root"], items["rows"]
    hf, hf_ids = write_hf_dataset_dict(root / "hf", rows)
    sources = {
        "files": (items["csv"], {}),
        "parquet": (write_parquet_shards(root / "parquet", rows), {}),
        "struct": (root / "struct" / "*.parquet", {"data__columns": {"image": "img", "text": "caption"}}),
        "webdataset": (write_webdataset(root / "wds", rows), {}),
        "hf": (hf, {"data__columns": {"image": "img", "text": "caption"}}),
        "s3": (s3_source, {}),
    }
    (root / "struct").mkdir()
    pq.write_table(table(rows, cell=lambda r: {"bytes": r["data"], "path": f"{r['id']}.png"}, image="img",
                         text="caption"), root / "struct" / "train-00000-of-00001.parquet")
    out = {}
    for name, (manifest, over) in sources.items():
        cfg = tiny_config(root / f"store-{name}", manifest, tiny_hf, data__name="colours", **over)
        report = extract(cfg, progress=False)
        rename = hf_ids if name == "hf" else {}
        out[name] = (cfg, report, {rename.get(k, k): v for k, v in features(cfg).items()})
    return out


@pytest.mark.parametrize("name", ["parquet", "struct", "webdataset", "hf", "s3"])
def test_a_shard_source_extracts_the_features_its_items_give_as_files(extracted, name):
    _, report, got = extracted[name]
    _, files_report, want = extracted["files"]
    assert set(got) == set(want) and report.rows == N + 1
    for rid, row in want.items():
        assert (got[rid]["split"], got[rid]["label"]) == (row["split"], row["label"]), rid
        assert np.allclose(got[rid]["text_vec"], row["text_vec"], atol=1e-6), rid
        if rid != "bad":
            assert np.allclose(got[rid]["image_vec"], row["image_vec"], atol=1e-6), rid
    # the corrupt image inside the shard is missing with the reason the corrupt file gets, and counted
    assert report.missing_counts["image"] == files_report.missing_counts["image"] == {"unreadable image": 1}
    assert json.loads(got["bad"]["issues"])["image"].startswith("unreadable image: cannot identify image file")


def test_reingesting_a_shard_encodes_nothing_even_from_another_folder(extracted, items, tiny_hf):
    import shutil
    from stores.extraction import extract
    cfg, first, _ = extracted["parquet"]
    assert sum(first.encoded.values()) > 0
    again = extract(cfg, progress=False)
    assert sum(again.encoded.values()) == 0 and again.added == 0 and again.skipped == N + 1
    moved = shutil.copytree(cfg.data.manifest, items["root"] / "parquet-moved")  # the same shards elsewhere
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": moved, "name": "moved"})})
    report = extract(other, progress=False)  # inline items are keyed by their bytes: the views already hold them
    assert report.added == N + 1 and sum(report.encoded.values()) == 0


def test_batches_stream_in_one_schema_and_names_come_from_the_source(items, extracted):
    cfg = extracted["webdataset"][0].data
    batches = list(iter_batches(cfg))
    assert all(b.schema.names == ["id", "split", "label", "image", "text"] for b in batches)
    assert sum(b.num_rows for b in batches) == N + 1 and len(batches) == 3  # one per shard
    assert batches[0].schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert {c.source_name for c in (cfg, extracted["struct"][0].data, extracted["s3"][0].data)} == \
        {"wds", "struct", "colours"}
    assert DataConfig(dataset="manifest", manifest="s3://b/x/items.parquet").dataset_name == "items"


def test_a_path_cell_in_a_remote_shard_is_missing_not_opened(items, s3_source):
    import boto3
    shard = items["root"] / "paths.parquet"
    pq.write_table(table(items["rows"][:3], cell=lambda r: f"{r['id']}.png"), shard)
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(str(shard), "shards", "paths/a.parquet")
    ds = load_dataset(DataConfig(dataset="manifest", manifest="s3://shards/paths/a.parquet"))
    assert all(r.payload["image"].reason.startswith("a file path in a remote source: s3://shards/paths/s0")
               for r in ds.records)


def truncated_tar(path: Path, rows: list[dict]) -> None:
    write_webdataset(path.parent / "wds", rows)
    data = (path.parent / "wds" / "train" / "000000.tar").read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, damage", [
    ("b.parquet", lambda p, rows: p.write_bytes(b"PAR1 this is not parquet")),
    ("b.tar", truncated_tar),
    ("b.csv", lambda p, rows: p.write_bytes(b'id,split,label,text\n1,train,a\n2,train,b,x,y\n')),
])
def test_a_shard_that_cannot_be_read_is_one_line_naming_it(items, tmp_path, name, damage):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table(items["rows"][:4]), folder / "a.parquet")
    damage(folder / name, items["rows"])
    manifest = folder / "*.parquet" if name.endswith("parquet") else folder / name
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(dataset="manifest", manifest=manifest))
    assert f"manifest shard {folder / name} cannot be read (" in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_shard_fails_mm_extract_in_one_line(extracted, items, tiny_hf, prefect_harness, tmp_path,
                                                          capsys):
    import yaml
    from flows.cli import main
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table(items["rows"][:4]), folder / "part-0.parquet")
    (folder / "part-1.parquet").write_bytes(b"PAR1 truncated")
    cfg = tiny_config(tmp_path, folder, tiny_hf)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as e:
        main(["extract", "-c", str(tmp_path / "c.yaml"), "--no-dvc"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Prefect's own log of the failed flow
    assert e.value.code == 2 and err.startswith(f"error: manifest shard {folder / 'part-1.parquet'} cannot be read (")


# ------------------------------------------------------------------ a rerun on unchanged shards (#21 fixed costs)
def test_an_unchanged_shard_source_is_answered_from_the_stores_record(extracted):
    """After a complete extraction whose inputs were all inside the shards, a rerun on the same shards gets the
    report the extraction itself gives with nothing to do, without reading the source; sources whose inputs are
    per-item files (a CSV of paths) or in object storage always run the extraction."""
    from stores.extraction import extract
    from stores.extraction.freshness import unchanged_report
    for name in ("parquet", "webdataset", "hf"):
        cfg = extracted[name][0]
        noop = extract(cfg, progress=False, use_record=False)  # the extraction's own pass over the source
        assert sum(noop.encoded.values()) == 0 and noop.added == 0
        fast = unchanged_report(cfg)
        assert fast is not None, name
        assert {**fast.as_dict(), "seconds": 0} == {**noop.as_dict(), "seconds": 0}, name
    for name in ("files", "s3"):
        extract(extracted[name][0], progress=False)
        assert unchanged_report(extracted[name][0]) is None, name


def test_a_changed_shard_or_store_is_extracted_again(items, tiny_hf, tmp_path):
    import shutil
    from stores.extraction import extract
    from stores.extraction.freshness import unchanged_report
    from stores.features.feature_store import FeatureStore
    shards = shutil.copytree(items["root"] / "parquet", tmp_path / "shards")
    cfg = tiny_config(tmp_path, shards, tiny_hf, data__name="changing")
    extract(cfg, progress=False, max_rows=5)  # a partial run leaves work: no record
    assert unchanged_report(cfg) is None
    extract(cfg, progress=False)
    assert unchanged_report(cfg) is not None
    rows = items["rows"]
    half = len(rows) // 2  # one title changes in the second shard (same file name, new bytes)
    pq.write_table(table([{**r, "text": "a brand new title"} if r["id"] == rows[half]["id"] else r
                          for r in rows[half:]]), shards / "part-00001.parquet")
    assert unchanged_report(cfg) is None
    again = extract(cfg, progress=False)
    assert again.encoded == {"image": 0, "text": 1} and again.updated == 1
    assert unchanged_report(cfg) is not None
    os.utime(shards / "part-00000.parquet")  # touched, same bytes: the extraction runs, and encodes nothing
    assert unchanged_report(cfg) is None
    assert sum(extract(cfg, progress=False).encoded.values()) == 0 and unchanged_report(cfg) is not None
    FeatureStore.for_config(cfg).table.delete(f"id = '{rows[0]['id']}'")  # a write from outside the extraction
    assert unchanged_report(cfg) is None
    assert extract(cfg, progress=False).added == 1 and unchanged_report(cfg) is not None
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": 6})})  # another data config
    assert unchanged_report(other) is None
    # every extraction path trusts the record as make and rsync trust a listing: bytes rewritten with the same
    # size and the old mtime put back are not read (the pass over the source would fail on them)
    shard = shards / "part-00000.parquet"
    st = shard.stat()
    shard.write_bytes(b"\0" * st.st_size)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert extract(cfg, progress=False).skipped == len(rows)
    with pytest.raises(DatasetError, match="part-00000.parquet cannot be read"):
        extract(cfg, progress=False, use_record=False)


def test_mm_extract_on_unchanged_shards_starts_no_flow_run(extracted, tmp_path):
    """The CLI answers from the record before any Prefect server is involved: with PREFECT_API_URL naming a port
    where nothing listens (which a flow run would fail on), it still reports the extraction, in ~the import's
    time (bench/scale.py)."""
    import subprocess
    import sys
    import yaml
    cfg = extracted["parquet"][0]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "extract", "-c", str(tmp_path / "c.yaml"), "--no-dvc",
                           "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.find("{"):])
    assert report["added"] == 0 and report["skipped"] == N + 1 and report["encoded"] == {"image": 0, "text": 0}
