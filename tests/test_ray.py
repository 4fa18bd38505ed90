"""Ray on a real local cluster (2 CPUs, started once per session): the sweep on prefect-ray's task runner, whose
runs all land in MLflow, with tasks that find the store and MLflow from a worker's own working directory."""
from mlflow.tracking import MlflowClient

from conftest import make_manifest, manifest_config


def test_sweep_on_ray_lands_every_run_in_mlflow(ray_cluster, prefect_harness, mlflow_db, tmp_path, monkeypatch):
    from flows.pipeline import run_sweep
    from stores.extraction import extract

    # relative paths, from a folder that is not the cluster's working directory: only absolute paths reach
    monkeypatch.chdir(tmp_path)
    mlflow_db(tmp_path / "mlruns" / "mlflow.db")  # what tracking.uri below names, new and empty
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=30, bad=False),
                          store={"root": "data/store", "write_every": 32, "index_min_rows": 10_000},
                          tracking={"uri": "sqlite:///mlruns/mlflow.db", "artifact_root": "mlruns/art"},
                          train={"epochs": 2, "batch_size": 16, "device": "cpu"},
                          sweep={"heads": [{"name": "early"}, {"name": "srmm"}], "seeds": [0, 1], "runner": "ray"},
                          ray={"num_cpus_per_task": 1})
    extract(cfg, progress=False)
    out = run_sweep(cfg)
    assert len(out.results) == 4
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    every = client.search_runs([client.get_experiment_by_name("manifest").experiment_id])
    # a transient failure is retried by the task: its FAILED attempt stays, tied to the retry by the task run
    failed = [r for r in every if r.info.status == "FAILED"]
    runs = [r for r in every if r.data.tags.get("kind") != "sweep" and r.info.status != "FAILED"]
    assert sorted(r.info.run_id for r in runs) == sorted(r.run_id for r in out.results), \
        [(r.info.status, r.data.tags.get("failed_reason")) for r in every]
    assert {r.data.tags["prefect_task_run"] for r in failed} <= {r.data.tags["prefect_task_run"] for r in runs}, \
        [r.data.tags.get("failed_reason") for r in failed]
    # the trainings on the Ray workers nest under the sweep's run, opened by the flow
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {out.run_id}
    assert len(every) == len(runs) + len(failed) + 1
    assert sorted((r.data.tags["head"], r.data.tags["seed"]) for r in runs) == [
        ("early", "0"), ("early", "1"), ("srmm", "0"), ("srmm", "1")]
    for r in runs:
        assert r.data.params["sweep.runner"] == "ray" and r.data.params["store.root"] == str(tmp_path / "data/store")
        assert r.info.artifact_uri.startswith((tmp_path / "mlruns" / "art").as_uri())
        assert "scenarios.csv" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {c.model for c in out.champions} == {"manifest-early", "manifest-srmm", "manifest"}
