"""Faults with real components: concurrent readers and writers on one store, and the MLflow tracking server or
the Prefect API unreachable. Each must fail clearly (or wait) and leave the store intact."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import free_port, make_manifest, manifest_config
from stores.features import filters
from stores.features.feature_store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ("import sys, json\nfrom stores.config_files import load_config\nfrom stores.extraction import extract\n"
           "from stores.features.feature_store import StoreError\ntry:\n"
           "    print(json.dumps(extract(load_config(sys.argv[1]), progress=False).as_dict()))\n"
           "except StoreError as e:\n    print('StoreError:', e)\n    sys.exit(2)\n")


def start_extraction(cfg, path: Path) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-c", EXTRACT, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def all_ids(store: FeatureStore) -> list[str]:
    return store.table.search().select(["id"]).limit(10_000).to_arrow()["id"].to_pylist()


def test_queries_and_reads_stay_consistent_while_extraction_writes(tmp_path):
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=60, bad=False), store__write_every=4)
    proc = start_extraction(cfg, tmp_path / "cfg.yaml")
    store = FeatureStore.for_config(cfg)
    counts, deadline = [], time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if not store._has(store.name) or store.table.count_rows() == 0:
            time.sleep(0.05)
            continue
        n = store.table.count_rows()
        split = store.read_split("train", ("vec", "tok"))  # one table version, decoded or from the cache
        assert split.ids == sorted(set(split.ids)) and split.batch.tok["text"].shape[0] == len(split.ids)
        hits = store.search(np.ones(store.meta.vec_dim["text"]), "text", k=3, where=filters.eq("split", "train"))
        # the query may see a later version than the read: rows only ever grow
        assert min(3, len(split.ids)) <= hits.num_rows <= 3 and set(hits["split"].to_pylist()) == {"train"}
        counts.append(n)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert json.loads(out.strip().splitlines()[-1])["rows"] == 60
    assert len(set(counts)) >= 2, f"reads never overlapped the writes: {counts}"
    assert counts == sorted(counts)  # readers never see rows disappear
    ids = all_ids(store)
    assert len(ids) == len(set(ids)) == 60
    assert len(store.read_split("train").ids) == sum(r == "train" for r in
                                                     store.table.to_arrow()["split"].to_pylist())


@pytest.mark.parametrize("lock_timeout_s", [0.0, 300.0])
def test_two_writers_on_one_store_one_fails_clearly_or_waits(tmp_path, lock_timeout_s):
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=16, bad=False),
                          store__lock_timeout_s=lock_timeout_s)
    procs = [start_extraction(cfg, tmp_path / f"cfg{i}.yaml") for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    store = FeatureStore.for_config(cfg)
    ids = all_ids(store)
    assert len(ids) == len(set(ids)) == 16  # whoever won, every row once
    if lock_timeout_s == 0:
        assert codes == [0, 2], outs
        loser = next(o for o in outs if o.startswith("StoreError"))
        assert "is being written by another process" in loser and "lock_timeout_s" in loser
    else:  # the second waits for the lock, then finds nothing left to do
        assert codes == [0, 0], outs
        added = sorted(json.loads(o.strip().splitlines()[-1])["added"] for o in outs)
        assert added == [0, 16]


def _store_state(store: FeatureStore) -> tuple:
    """The dataset table, the views and the search table (a run may add its masks to the separate mask table)."""
    return store.versions(), store.table.version, store.table.count_rows(), store.meta.fingerprint


def test_mlflow_unreachable_fails_before_training_and_store_is_intact(colour_store, prefect_harness):
    from flows.pipeline import train_flow
    from stores.health import ServiceUnreachable

    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    before = _store_state(store)
    url = f"http://127.0.0.1:{free_port()}"
    bad = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": url, "connect_timeout_s": 2})})
    t0 = time.time()
    with pytest.raises(ServiceUnreachable, match=f"MLflow tracking server at {url}/health is unreachable after 2 s"):
        train_flow(bad)
    assert time.time() - t0 < 60  # no retry storm: the health wait is not retried by the task
    assert _store_state(store) == before


def test_prefect_api_unreachable_cli_fails_clearly_and_store_is_intact(colour_store, tmp_path):
    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    before = _store_state(store)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": api}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "--connect-timeout", "2", *cmd, "-c",
                               str(tmp_path / "cfg.yaml")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for cmd in (["train"], ["extract", "--no-dvc"])]  # both commands at once
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr
        assert f"error: Prefect API at {api}/health is unreachable after 2 s" in stderr
        assert "Traceback" not in stderr and time.time() - t0 < 60
    assert _store_state(store) == before


def test_mlflow_server_lost_mid_run_fails_clearly_and_store_is_intact(colour_store, prefect_harness, mlflow_db,
                                                                     tmp_path, monkeypatch):
    """A real MLflow server answers the preflight, then dies while the head trains: logging fails after
    bounded retries, the task's retry finds the server gone and the flow fails naming it."""
    import signal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the default here is 3; the test needs one
    import urllib.request

    from flows.pipeline import train_flow
    from stores.health import ServiceUnreachable, wait_healthy

    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store)
    before = _store_state(store)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", mlflow_db(tmp_path / "mlflow.db"), "--default-artifact-root",
                               (tmp_path / "art").as_uri(), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"{url}/health", 300, "test MLflow server", "")  # a ceiling: a loaded 2-core box took >120 s
        tracking = cfg.tracking.model_copy(update={"uri": url, "connect_timeout_s": 2, "experiment": "lost"})
        import threading
        outcome = {}

        def run():
            try:
                outcome["result"] = train_flow(cfg.model_copy(update={"tracking": tracking}))
            except Exception as e:  # noqa: BLE001 - the failure is what the test checks
                outcome["error"] = e
        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 120
        while time.time() < deadline:  # the run's experiment exists: the preflight passed, training starts
            try:
                with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lost",
                                            timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        t0 = time.time()
        t.join(300)
        assert not t.is_alive(), "the run hung after losing the tracking server"
        assert time.time() - t0 < 180
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert "result" not in outcome
    assert isinstance(outcome["error"], ServiceUnreachable), repr(outcome["error"])
    assert f"MLflow tracking server at {url}/health is unreachable" in str(outcome["error"])
    assert _store_state(store) == before


def test_a_retried_training_leaves_its_failed_attempt_marked_and_returns_the_retry(colour_store, prefect_harness,
                                                                                    mlflow_db, tmp_path, monkeypatch):
    """A transient failure in training is retried by the task: the first attempt's run ends FAILED with the
    reason, the retry's run (same Prefect task run, attempt 2) is the one returned and the only FINISHED one."""
    import tasks.training as training
    from flows.pipeline import train_flow
    from mlflow.tracking import MlflowClient

    real, calls = training.train_and_evaluate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_and_evaluate", flaky)
    monkeypatch.setattr(training, "train_head", training.train_head.with_options(retry_delay_seconds=0))
    cfg = colour_store[0].model_copy(deep=True)
    cfg.train.epochs = 1
    cfg.tracking = cfg.tracking.model_copy(update={"uri": mlflow_db(tmp_path / "mlflow.db"),
                                                   "artifact_root": str(tmp_path / "art")})
    row = train_flow(cfg)
    client = MlflowClient(cfg.tracking.uri)
    runs = {r.data.tags["attempt"]: r for r in client.search_runs([e.experiment_id
                                                                   for e in client.search_experiments()])}
    assert len(calls) == 2 and sorted(runs) == ["1", "2"]
    failed, finished = runs["1"], runs["2"]
    assert failed.info.status == "FAILED" and finished.info.status == "FINISHED"
    assert failed.data.tags["failed_reason"] == "RuntimeError: database is locked (injected)"
    assert failed.data.tags["prefect_task_run"] == finished.data.tags["prefect_task_run"]
    assert row.run_id == finished.info.run_id
