"""The registered model serves where this repository is not importable: `mlflow models serve` from a folder
outside the repo, in an environment that has the project's third-party packages but not the project."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_http


@pytest.fixture(scope="module")
def colours_model(colour_store, prefect_harness, tmp_path_factory):
    """A tiny `early` head trained by the real train flow on the colour store, named by ``data.name``."""
    from flows.pipeline import train_flow
    from models.heads import parse_head_config
    from stores.extraction import extract

    cfg, _ = colour_store
    tmp = tmp_path_factory.mktemp("colours")
    cfg = cfg.model_copy(deep=True, update={"head": parse_head_config({"name": "early"})})
    cfg.data.name = "colours"
    cfg.store.root = tmp / "store"
    cfg.tracking.uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    cfg.tracking.artifact_root = str(tmp / "mlruns" / "art")
    cfg.train.epochs = 3
    cfg.train.patience = 5
    extract(cfg, progress=False)
    return cfg, train_flow(cfg)


def test_registered_names_use_the_dataset_name(colours_model):
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_experiment_by_name("colours") is not None and client.get_experiment_by_name("manifest") is None
    [version] = client.search_model_versions("name = 'colours-early'")
    assert version.run_id == out["run_id"]
    assert not client.search_model_versions("name = 'manifest-early'")


def test_run_is_open_while_training_with_live_epochs(colours_model):
    """The run starts before the first epoch is logged, lasts at least the fit, and has one point per epoch."""
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out["run_id"])
    loss = client.get_metric_history(out["run_id"], "train/train_loss")
    assert sorted(m.step for m in loss) == list(range(len(loss))) and len(loss) >= 1
    assert run.info.start_time < min(m.timestamp for m in loss)
    fit_s = run.data.metrics["fit/seconds"]
    assert (run.info.end_time - run.info.start_time) / 1000 >= fit_s
    assert max(m.timestamp for m in loss) <= run.info.end_time


def _isolated_python(root: Path) -> Path:
    """A venv whose site-packages reaches the shared venv's packages through a plain path line: .pth files
    there (the editable install of this repo) are not processed, so the project is not importable."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(root)],
                   check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / "shared_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = root / "bin" / "python"
    uvicorn = root / "bin" / "uvicorn"  # what the scoring server launches, bound to the isolated interpreter
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


def test_registered_model_serves_outside_the_repo(colours_model, tmp_path):
    cfg, out = colours_model
    python = _isolated_python(tmp_path / "venv")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{python.parent}:{env['PATH']}", MLFLOW_TRACKING_URI=cfg.tracking.uri)
    probe = subprocess.run([str(python), "-c", "import stores"], cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'stores'" in probe.stderr
    assert subprocess.run([str(python), "-c", "import mlflow, torch, lancedb"], cwd=work, env=env).returncode == 0

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", "models:/colours-early/1",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_http(f"http://127.0.0.1:{port}/ping", 240, proc):
            pytest.fail(f"server did not answer /ping:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
        body = json.dumps({"dataframe_records": [{"image": None, "text": "deep blue ocean"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=180) as r:
            [pred] = json.loads(r.read())["predictions"]
        assert pred["label"] in ["class0", "class1", "class2"] and 0 < pred["prob"] <= 1
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def test_compare_of_one_seed_shows_no_spread(colours_model, capsys):
    from flows.cli import main
    cfg, _ = colours_model
    args = ["--set", "data.dataset=manifest", "--set", "data.name=colours", "--set", f"tracking.uri={cfg.tracking.uri}"]
    main(["compare", *args])
    human = capsys.readouterr().out
    assert "early" in human and "grid mean" in human and "±" not in human
    main(["compare", "--json", *args])
    res = json.loads(capsys.readouterr().out)
    assert res["experiment"] == "colours" and res["table"][0]["seeds"] == 1
    assert res["table"][0]["grid_mean"]["sd"] is None
