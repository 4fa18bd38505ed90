"""The registered model serves where this repository is not importable: `mlflow models serve` from a folder
outside the repo, in an environment that has the project's third-party packages but not the project."""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from conftest import served_model


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
    assert version.run_id == out.run_id
    assert not client.search_model_versions("name = 'manifest-early'")


def test_mm_train_sets_the_dataset_champion_when_there_is_none(colours_model):
    """``models:/<data.name>@champion`` (the best model of any head) exists after a single ``mm train``, so the
    README's serve command works after any run; the run records the process that owned it."""
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    champ = client.get_model_version_by_alias("colours", "champion")
    assert champ.run_id == out.run_id
    tags = client.get_run(out.run_id).data.tags
    assert tags["pid"].isdigit() and tags["host"] and tags["pid_started"]


def test_run_is_open_while_training_with_live_epochs(colours_model):
    """The run starts before the first epoch is logged, lasts at least the fit, and has one point per epoch."""
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out.run_id)
    loss = client.get_metric_history(out.run_id, "train/train_loss")
    assert sorted(m.step for m in loss) == list(range(len(loss))) and len(loss) >= 1
    assert run.info.start_time < min(m.timestamp for m in loss)
    fit_s = run.data.metrics["fit/seconds"]
    assert (run.info.end_time - run.info.start_time) / 1000 >= fit_s
    assert max(m.timestamp for m in loss) <= run.info.end_time


def test_registered_model_serves_outside_the_repo(colours_model, tmp_path):
    cfg, out = colours_model
    with served_model("models:/colours-early/1", cfg.tracking.uri, tmp_path) as (invoke, python, env, work):
        probe = subprocess.run([str(python), "-c", "import stores"], cwd=work, env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "No module named 'stores'" in probe.stderr
        assert subprocess.run([str(python), "-c", "import mlflow, torch, lancedb"], cwd=work, env=env).returncode == 0
        [pred] = invoke([{"image": None, "text": "deep blue ocean"}])
        assert pred["label"] in ["class0", "class1", "class2"] and 0 < pred["prob"] <= 1
        # inline image bytes are read; a server-side path is not (no MM_SERVE_ROOTS); nothing usable abstains
        image = Path(cfg.data.manifest).parent / "img6.jpg"
        inline = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
        sent, probe, empty = invoke([{"image": inline, "text": None}, {"image": "/etc/passwd", "text": None},
                                     {"image": None, "text": None}])
        assert sent["present"] == ["image"] and sent["abstain"] is False
        assert probe["abstain"] is True and "server-side paths are not read here" in probe["reason"]
        assert empty["abstain"] is True and not isinstance(empty["label"], str)  # null (pandas may write NaN)


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
