"""Object storage through the real clients against an S3-compatible server on loopback (moto's standalone
server): MLflow artifacts and registered models on s3://, the DVC remote on s3://, and LanceDB tables at s3://."""
import os

import pytest

from conftest import manifest_config

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port) with buckets mlflow, dvc and lance; AWS_* and
    MLFLOW_S3_ENDPOINT_URL point the clients at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=url)
    for bucket in ("mlflow", "dvc", "lance"):
        client.create_bucket(Bucket=bucket)
    yield url, client
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_mlflow_artifacts_and_models_on_s3(s3, colour_store, mlflow_db, tmp_path):
    from mlflow.tracking import MlflowClient
    from models.config import TrackingConfig
    from models.heads import parse_head_config
    from runs.train import train_and_evaluate
    from stores.tracking.runs import Tracker, load_predictor

    _, client = s3
    cfg, _ = colour_store
    cfg = cfg.model_copy(update={"head": parse_head_config({"name": "early"}),
                                 "train": cfg.train.model_copy(update={"epochs": 1})})
    tracking = TrackingConfig(uri=mlflow_db(tmp_path / "mlflow.db"), artifact_root="s3://mlflow/runs")
    run_id = Tracker(tracking, "manifest").log_run(train_and_evaluate(cfg))
    run = MlflowClient(tracking.uri).get_run(run_id)
    assert run.info.artifact_uri.startswith("s3://mlflow/runs/manifest/")
    stored = keys(client, "mlflow", "runs/manifest/")
    assert any(k.endswith(f"{run_id}/artifacts/scenarios.csv") for k in stored)
    assert any(k.endswith("robustness_curve.png") for k in stored)
    assert {"scenarios.csv", "config.yaml"} <= {a.path for a in MlflowClient(tracking.uri).list_artifacts(run_id)}
    # the registered model is read back from S3 and classifies a raw sample with the image missing
    predictor = load_predictor("models:/manifest-early/1", tracking)
    out = predictor.predict([{"image": None, "text": "leafy green grass"}])
    assert out[0]["present"] == ["text"] and out[0]["label"] in {"class0", "class1", "class2"}


def test_dvc_remote_on_s3_round_trip(s3, colour_store, git_repo):
    import shutil

    from tasks.extraction import version_store
    from stores.features import versioning
    from stores.features.feature_store import FeatureStore
    from test_versioning import digest

    url, client = s3
    cfg, report = colour_store
    shutil.copytree(cfg.store.root, git_repo / "data" / "store", ignore=shutil.ignore_patterns("*.lock"))
    before = digest(git_repo / "data")
    cfg = manifest_config(git_repo, cfg.data.manifest, store={"root": str(git_repo / "data" / "store"),
                          "dvc_repo": str(git_repo), "dvc_remote": "s3://dvc/mmrobust",
                          "dvc_remote_options": {"endpointurl": url}})
    out = version_store.fn(cfg)  # dvc add + dvc push to the configured S3 remote
    assert out.dvc_hash.endswith(".dir") and out.data_dir == "data"
    assert any(k.startswith("mmrobust/files/md5/") for k in keys(client, "dvc"))
    shutil.rmtree(git_repo / "data")
    shutil.rmtree(git_repo / ".dvc" / "cache")
    versioning.pull(git_repo)
    assert digest(git_repo / "data") == before
    assert FeatureStore(git_repo / "data" / "store", report.store).table.count_rows() == 36


def test_lancedb_table_on_s3(s3):
    """What the feature store needs from LanceDB at an s3:// root: create, append, open from a new connection,
    filtered and vector search, an IVF-PQ index, versions and time travel, update and merge-insert."""
    import lancedb
    import numpy as np
    from lancedb.index import IvfPq
    import pyarrow as pa

    url, client = s3
    opts = {"aws_endpoint": url, "allow_http": "true", "aws_region": "us-east-1",
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    rng = np.random.default_rng(0)

    def rows(ids):
        vec = rng.normal(size=(len(ids), 16)).astype(np.float32)
        return pa.table({"id": ids, "split": ["train"] * len(ids),
                         "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 16)})

    db = lancedb.connect("s3://lance/store", storage_options=opts)
    first = rows([f"r{i}" for i in range(300)])
    table = db.create_table("colours", first)
    table.add(rows([f"x{i}" for i in range(10)]))
    assert any(k.startswith("store/colours.lance/_versions/") for k in keys(client, "lance"))
    again = lancedb.connect("s3://lance/store", storage_options=opts).open_table("colours")
    assert again.count_rows() == 310 and again.list_versions()[-1]["version"] == 2
    query = first["vec"][7].as_py()
    assert again.search(query).limit(1).to_arrow()["id"].to_pylist() == ["r7"]
    table.create_index("vec", config=IvfPq(distance_type="cosine", num_partitions=2, num_sub_vectors=4))
    hits = lancedb.connect("s3://lance/store", storage_options=opts).open_table("colours").search(query) \
        .nprobes(2).where("split = 'train'").limit(5).to_arrow()["id"].to_pylist()
    assert "r7" in hits and [i.name for i in table.list_indices()] == ["vec_idx"]
    table.update(where="id = 'r1'", values={"split": "val"})
    table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows(["r2", "new"]))
    assert table.count_rows() == 311 and table.count_rows("split = 'val'") == 1
    table.checkout(2)
    assert table.count_rows() == 310 and table.count_rows("split = 'val'") == 0


def test_feature_store_on_s3(s3, tmp_path, capsys):
    """store.root = s3://...: extract (tables and JSON metadata in the bucket, the split cache on local disk),
    read a split, train a head through the runner, read pinned older versions, `mm store info` and `mm query`."""
    import json

    import yaml

    from conftest import make_manifest
    from flows.cli import main
    from models.heads import parse_head_config
    from stores.extraction import extract
    from stores.features.feature_store import StoreError, open_store
    from stores.features.location import StoreLocation
    from runs.train import train_and_evaluate
    from tasks.extraction import version_store

    url, client = s3
    manifest = make_manifest(tmp_path / "raw", n=15)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    cfg = manifest_config(tmp_path, manifest,
                          store={"root": "s3://lance/features", "storage_options": {"aws_endpoint": url},
                                 "cache_dir": str(tmp_path / "cache"), "write_every": 5, "index_min_rows": 10_000})
    first = extract(cfg, progress=False, max_rows=5)  # an incremental slice, then the rest
    old = open_store(cfg).versions()
    report = extract(cfg, progress=False)
    assert first.rows == 5 and report.rows == 15 and report.encoded["image"] == 10
    stored = keys(client, "lance", "features/")
    for name in (report.store, "manifest", *open_store(cfg).view_names.values()):
        assert any(k.startswith(f"features/{name}.lance/_versions/") for k in stored), name
    assert {f"features/{report.store}.json", "features/manifest.json"} <= set(stored)
    assert not any(k.endswith(".lock") for k in stored)  # the writer locks were released
    assert not (tmp_path / "data").exists()  # nothing beside the manifest on local disk ...

    store = open_store(cfg)
    train = store.read_split("train")
    assert train.ids == [r["id"] for r in rows if r["split"] == "train"] and len(train.batch.vec["image"]) == 7
    assert list((tmp_path / "cache" / f"{report.store}.cache").rglob("*.npy"))  # ... but the split cache
    assert open_store(cfg).read_split("train").batch.vec["image"].equal(train.batch.vec["image"])

    # time travel: pinned at the versions after the first 5 rows, a read sees exactly those rows
    pinned_cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"versions": old})})
    pinned = open_store(pinned_cfg)
    assert sorted(i for s in ("train", "val", "test") for i in pinned.read_split(s).ids) == \
        [r["id"] for r in rows[:5]]

    head_cfg = cfg.model_copy(update={"head": parse_head_config({"name": "early"}),
                                      "train": cfg.train.model_copy(update={"epochs": 2})})
    result = train_and_evaluate(head_cfg)
    assert result.store.versions == store.versions() and 0 <= result.summary["complete_acc"] <= 1
    assert result.fit.epochs_run == 2
    assert any(k.startswith("features/manifest-masks.lance/") for k in keys(client, "lance", "features/"))

    # a second writer is refused while the dataset table's lock object exists
    with StoreLocation.for_config(cfg.store).lock("manifest", 0):
        with pytest.raises(StoreError, match="being written by another process.*s3://lance/features/manifest.lock"):
            extract(cfg, progress=False)
    assert "Lance table versions" in version_store.fn(cfg).dvc  # not under DVC

    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    main(["store", "info", "-c", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == "s3://lance/features" and info["config"]["rows"] == 15
    assert info["tables"]["manifest"]["kind"] == "dataset" and info["tables"]["manifest"]["bytes"] > 0
    main(["query", "-c", str(path), "--id", "s010", "--modality", "image", "-k", "3", "--json"])
    hits = json.loads(capsys.readouterr().out)["neighbours"]
    assert len(hits) == 3 and "s010" not in [h["id"] for h in hits]  # --id leaves the row itself out
    assert hits[0]["distance"] <= hits[-1]["distance"]


def test_s3_writer_lock_is_a_conditional_write(s3, monkeypatch):
    """Exactly one of many writers creates the lock object (If-None-Match: *); a lock left by a dead process on
    this host is taken over, one held elsewhere is reported with how to remove it. Endpoint from AWS_ENDPOINT_URL."""
    import json
    import socket
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    from stores.features.location import StoreError, StoreLocation

    url, client = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    loc = StoreLocation("s3://lance/locks")
    assert loc.options["aws_endpoint"] == url and loc.options["allow_http"] == "true"
    locks = [StoreLocation("s3://lance/locks") for _ in range(6)]

    def try_lock(loc):
        try:
            with loc.lock("t", 0):
                time.sleep(2)  # held while the others try
                return "held"
        except StoreError as e:
            return str(e)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(try_lock, locks))
    assert outcomes.count("held") == 1, outcomes
    refused = [o for o in outcomes if o != "held"]
    assert all("is being written by another process" in o and "aws s3 rm s3://lance/locks/t.lock" in o
               for o in refused)
    assert keys(client, "lance", "locks/") == []  # released

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.put_object(Bucket="lance", Key="locks/t.lock",
                      Body=json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    with loc.lock("t", 0):  # taken over
        body = json.loads(client.get_object(Bucket="lance", Key="locks/t.lock")["Body"].read())
        assert body["pid"] == os.getpid()
    client.put_object(Bucket="lance", Key="locks/t.lock",
                      Body=json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}).encode())
    with pytest.raises(StoreError, match="pid 1 on elsewhere since then"):
        with loc.lock("t", 0.2):
            pass
    assert keys(client, "lance", "locks/") == ["locks/t.lock"]  # not ours to remove
