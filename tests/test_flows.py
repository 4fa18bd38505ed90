"""Prefect flows + MLflow (sqlite) end to end on a real AV-MNIST subset: pipeline, registry, champion,
compare, predict with a missing modality, content-keyed caching, and a cron deployment that fires."""
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import DATASETS, free_port, wait_http


@pytest.fixture(scope="module")
def pipeline_run(avmnist_cfg, prefect_harness, mlflow_db, tmp_path_factory):
    import subprocess
    from flows.pipeline import pipeline_flow
    repo = avmnist_cfg.store.root.parents[1]  # <tmp>/data/store -> <tmp>
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    cfg = avmnist_cfg.model_copy(deep=True)
    mlruns = tmp_path_factory.mktemp("mlruns")
    cfg.tracking.uri, cfg.tracking.artifact_root = mlflow_db(mlruns / "mlflow.db"), str(mlruns / "art")
    cfg.store.dvc_repo = repo
    cfg.sweep.heads = [{"name": "early"}, {"name": "mmp"}]
    cfg.sweep.seeds = [0, 1]
    return cfg, pipeline_flow(cfg)


def test_pipeline_registers_models_with_scenario_metrics(pipeline_run):
    cfg, out = pipeline_run
    assert out.extract.report.rows == 120 and out.extract.version.dvc_hash.endswith(".dir")
    assert len(out.sweep.results) == 4
    client = MlflowClient(cfg.tracking.uri)
    for head in ("early", "mmp"):
        versions = client.search_model_versions(f"name = 'avmnist-{head}'")
        assert len(versions) == 2
        champ = client.get_model_version_by_alias(f"avmnist-{head}", "champion")
        run = client.get_run(champ.run_id)
        best = max(client.get_run(v.run_id).data.metrics["summary/grid_mean_acc"] for v in versions)
        assert run.data.metrics["summary/grid_mean_acc"] == best
        assert "test/acc/image-000/audio-100" in run.data.metrics
        assert run.data.params["head.name"] == head and run.data.params["train.epochs"] == "3"
        assert run.data.tags["dvc_hash"] == out.extract.version.dvc_hash
        assert run.data.tags["store_fingerprint"] == out.extract.report.fingerprint
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"robustness_curve.png", "confusion_matrix.png", "per_class_f1.png", "scenarios.csv", "config.yaml",
                "masks_seed0.parquet" if run.data.tags["seed"] == "0" else "masks_seed1.parquet"} <= arts
    report = open(out.sweep.report).read()
    assert "image-000/audio-100" in report and "mmp" in report


def test_compare_table_has_every_head_and_seed(pipeline_run):
    from runs.reporting import compare_table
    cfg, _ = pipeline_run
    table = compare_table(cfg.tracking, "avmnist")
    # the head column names the variant, e.g. mmp[tokens:frozen_output_tokens+fusion_transformer]
    assert {h.split("[")[0] for h in table["head"]} == {"early", "mmp"} and set(table["seeds"]) == {2}
    assert "image-000/audio-000" in table.columns and "±" in table["image-000/audio-000"].iloc[0]


def test_compare_and_report_show_the_same_table(pipeline_run, capsys):
    """One table builder: `mm compare` (from MLflow) and the sweep report (from the results) agree, grid mean
    included; `--json` gives the same numbers, machine-readable."""
    import json
    from flows.cli import main
    from runs.reporting import compare_table, to_markdown
    cfg, out = pipeline_run
    table = to_markdown(compare_table(cfg.tracking, "avmnist"))
    assert "grid_mean" in table.splitlines()[0] and table in open(out.sweep.report).read()
    main(["compare", "--json", "--set", "data.dataset=avmnist", "--set", f"tracking.uri={cfg.tracking.uri}"])
    res = json.loads(capsys.readouterr().out)
    assert res["experiment"] == "avmnist" and len(res["table"]) == 2
    grid = {r["head"]: r["grid_mean"] for r in res["table"]}
    for r in out.sweep.results:
        assert grid[r.variant]["n"] == 2
    early = [r.summary["grid_mean_acc"] for r in out.sweep.results if r.variant == "early"]
    assert grid["early"]["mean"] == pytest.approx(sum(early) / 2)


def test_predict_from_champion_with_a_missing_modality(pipeline_run):
    from stores.tracking.runs import load_predictor
    cfg, _ = pipeline_run
    pred = load_predictor("models:/avmnist-mmp@champion", cfg.tracking)
    clip = str(DATASETS / "fsdd" / "recordings" / "7_theo_3.wav")
    out = pred.predict([{"audio": clip, "image": None}, {"audio": None, "image": None}])
    assert out[0]["present"] == ["audio"] and out[0]["label"] in [str(d) for d in range(10)]
    assert out[0]["abstain"] is False and 0 < out[0]["prob"] <= 1
    # nothing usable sent: no guess from placeholders alone (it used to answer with p ~0.8)
    assert out[1] == {"label": None, "prob": None, "present": [], "abstain": True,
                      "reason": "no usable modality: all missing"}
    bad = pred.predict([{"audio": str(DATASETS / "no-such.wav"), "image": None}])[0]  # unreadable: abstains, says why
    assert bad["abstain"] is True and bad["reason"].startswith("no usable modality (audio: unreadable audio")
    pred.cfg.tracking.abstain_below = 0.999999  # the threshold set at registration (tracking.abstain_below)
    unsure = pred.predict([{"audio": clip, "image": None}])[0]
    assert unsure["abstain"] is True and unsure["reason"].startswith("low confidence") and unsure["label"]
    # the registered pyfunc serves a DataFrame too
    mlflow.set_tracking_uri(cfg.tracking.uri)
    import pandas as pd
    model = mlflow.pyfunc.load_model("models:/avmnist-early@champion")
    df = model.predict(pd.DataFrame([{"image": None, "audio": clip}]))
    assert list(df.columns)[:2] == ["label", "prob"]
    # a request packs the inputs its head reads: MMP's tokens, only pooled vectors for a vector head
    assert set(pred.features([{"audio": clip, "image": None}]).tok) == {"image", "audio"}
    vec = load_predictor("models:/avmnist-early@champion", cfg.tracking).features([{"audio": clip, "image": None}])
    assert set(vec.vec) == {"image", "audio"} and not vec.tok and not vec.emb


def test_train_results_are_cached_by_content(pipeline_run):
    from flows.pipeline import train_flow
    cfg, out = pipeline_run
    one = cfg.model_copy(update={"head": __import__("models.heads", fromlist=["x"]).parse_head_config({"name": "early"}),
                                 "seed": 0})
    first = train_flow(one)
    again = train_flow(one)
    assert again.run_id == first.run_id  # second call served from the cache, no new MLflow run
    moved = one.model_copy(deep=True)
    moved.tracking.experiment = None  # the same experiment by default name: the same key
    assert train_flow(moved).run_id == first.run_id
    other = one.model_copy(update={"seed": 5})
    assert train_flow(other).run_id != first.run_id


def test_a_cached_result_is_not_answered_where_its_run_does_not_exist(pipeline_run, mlflow_db, tmp_path):
    """Another tracking store (a fresh clone beside the same Prefect cache, a reset mlruns/) or a deleted run:
    the head is trained again and logged there, instead of returning a run id that store does not have."""
    from flows.pipeline import train_flow
    cfg, _ = pipeline_run
    one = cfg.model_copy(update={"head": __import__("models.heads", fromlist=["x"]).parse_head_config({"name": "early"}),
                                 "seed": 6})
    first = train_flow(one).run_id
    elsewhere = one.model_copy(deep=True)
    elsewhere.tracking.uri = mlflow_db(tmp_path / "other" / "mlflow.db")
    elsewhere.tracking.artifact_root = str(tmp_path / "other" / "art")
    second = train_flow(elsewhere).run_id
    assert second != first and MlflowClient(elsewhere.tracking.uri).get_run(second).info.status == "FINISHED"
    client = MlflowClient(cfg.tracking.uri)
    client.delete_run(first)
    third = train_flow(one).run_id
    assert third != first and client.get_run(third).info.lifecycle_stage == "active"
    assert train_flow(one).run_id == third  # and the cache answers with the new run from then on


def test_evaluate_flow_on_registered_model(pipeline_run):
    from flows.pipeline import evaluate_flow
    cfg, _ = pipeline_run
    out = evaluate_flow(cfg, "models:/avmnist-early@champion")
    assert set(out.scenarios) >= {"image-000/audio-000", "image-100/audio-000"}
    assert 0 <= out.summary["grid_mean_acc"] <= 1


@pytest.fixture()
def local_prefect_server(tmp_path):
    """A real `prefect server start` on 127.0.0.1 (its scheduler service included), temporary database."""
    import os
    import subprocess
    import sys
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc):
        proc.kill()
        pytest.fail("prefect server did not start in 120 s")
    yield env
    proc.terminate()
    proc.wait(30)


def test_cron_deployment_fires_on_the_local_server(avmnist_cfg, avmnist_store, local_prefect_server, tmp_path):
    """`mm deploy` registers the config's cron deployments on the local Prefect server, whose scheduler creates
    runs that the served deployments execute: the every-minute extract deployment fires and completes."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import httpx
    import yaml
    from flows.deploy import deployments

    cfg = avmnist_cfg.model_copy(deep=True)
    cfg.schedule.extract_cron = "* * * * *"
    deps = deployments(cfg, name_prefix="test")
    assert [d.name for d in deps] == ["test-nightly-pipeline", "test-incremental-extract"]
    assert deps[0].schedules[0].schedule.cron == cfg.schedule.pipeline_cron
    repo = cfg.store.root.parents[1]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    cfg.store.dvc_repo = repo
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**local_prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    api = env["PREFECT_API_URL"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", str(tmp_path / "cfg.yaml")],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    completed, deadline = [], time.time() + 240
    try:
        while time.time() < deadline and not completed and proc.poll() is None:
            time.sleep(3)
            try:
                runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).json()
            except httpx.HTTPError:
                continue
            completed = [r for r in runs if r["deployment_id"]]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert completed, "the cron deployment did not fire and complete within 240 s"
    dep = httpx.get(f"{api}/deployments/{completed[0]['deployment_id']}").json()
    assert dep["name"] == "avmnist-incremental-extract"
    assert completed[0]["parameters"]["config"]["schedule"]["extract_cron"] == "* * * * *"
