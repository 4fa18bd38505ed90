"""Fixed costs of a training process (issue 21): the logged model keeps its input example, but the training process
does not load the model back to validate it (MLflow's serving-input check, 4 s of a 200-row ``mm train``); the
stored example is answered here instead, through MLflow's own scoring path. The ``mm`` process's collector policy
(flows.collector) and the imports a command leaves out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_manifest, manifest_config


@pytest.fixture(scope="module")
def trained(tiny_hf, tmp_path_factory):
    """An `early` head trained and logged by the run layer (what the train task runs) on a 36-row store of the
    tiny HF encoders, with every ``mlflow.pyfunc.load_model`` call made during training and logging recorded."""
    import mlflow.pyfunc
    import mlflow.utils.environment

    from runs.train import train_and_evaluate
    from stores.extraction import extract
    from stores.features.feature_store import open_store
    from stores.tracking.runs import Tracker

    tmp = tmp_path_factory.mktemp("fixed")
    cfg = manifest_config(tmp, make_manifest(tmp / "raw", bad=False), head={"name": "early"}, data__name="fixed",
                          encoders__image={"kind": "hf", "model": str(tiny_hf["image"]), "image_size": 32},
                          encoders__text={"kind": "hf", "model": str(tiny_hf["text"])}, train__epochs=2)
    extract(cfg, progress=False)
    loads, real = [], mlflow.pyfunc.load_model

    def recording_load(*args, **kwargs):
        loads.append(args[0] if args else kwargs.get("model_uri"))
        return real(*args, **kwargs)

    checked = []  # MLflow's environment-vs-requirements check (see test_logging_skips_the_requirements_check)
    mp = pytest.MonkeyPatch()
    mp.setattr(mlflow.pyfunc, "load_model", recording_load)
    mp.setattr(mlflow.utils.environment, "warn_dependency_requirement_mismatches", checked.append)
    try:
        tracker = Tracker(cfg.tracking, cfg.data.dataset_name)
        with tracker.live_run(cfg) as run:
            run.finish(train_and_evaluate(cfg, open_store(cfg)))
    finally:
        mp.undo()
    uri = f"models:/{tracker.model_name(cfg.head.label)}/1"
    return cfg, uri, loads, checked


def test_training_logs_the_model_without_loading_it_back(trained):
    """MLflow's log_model validates an input example by loading the model (its encoders too) and predicting it,
    in the training process; the project logs the example without that load."""
    _, _, loads, _ = trained
    assert loads == []


def test_logging_skips_the_requirements_check_but_pins_the_installed_versions(trained, tmp_path):
    """MLflow checks a model's requirements against the running environment by mapping every installed
    distribution's files to modules (1.3 s a logged model); ours are read from that environment, so the check
    is skipped, and the pins are still the installed versions."""
    import importlib.metadata as md

    import mlflow

    cfg, uri, _, checked = trained
    assert checked == []
    mlflow.set_tracking_uri(cfg.tracking.uri)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    pins = dict(line.split("==") for line in (local / "requirements.txt").read_text().split() if "==" in line)
    assert pins["torch"] == md.version("torch").split("+")[0] and pins["lancedb"] == md.version("lancedb")
    import mlflow.utils.environment as env

    from stores.tracking.pyfunc import requirements_unchecked
    check = env.warn_dependency_requirement_mismatches
    with requirements_unchecked():
        assert env.warn_dependency_requirement_mismatches is not check
    assert env.warn_dependency_requirement_mismatches is check  # restored after the call


def test_the_logged_model_keeps_its_input_example_for_the_ui_and_the_server(trained, tmp_path):
    import mlflow
    from mlflow.models import Model

    from stores.tracking.pyfunc import input_example

    cfg, uri, *_ = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    model = Model.load(local)
    assert model.saved_input_example_info["serving_input_path"] == "serving_input_example.json"
    assert model.load_input_example(str(local)).equals(input_example(["image", "text"]))
    assert json.loads((local / "serving_input_example.json").read_text()) == {
        "dataframe_split": {"columns": ["image", "text"], "data": [[None, "black leather shoes for men"]]}}
    assert model.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert model.signature is not None and [c.name for c in model.signature.inputs.inputs] == ["image", "text"]


def test_the_logged_model_answers_its_stored_serving_example(trained, tmp_path):
    """What the skipped check did, once here: the scoring server's parsing and predict (``mlflow.models.predict``
    in this interpreter) on the model's own ``serving_input_example.json``."""
    import mlflow
    from mlflow.models import predict

    cfg, uri, *_ = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    out = tmp_path / "predictions.json"
    predict(model_uri=str(local), input_path=str(local / "serving_input_example.json"), content_type="json",
            output_path=str(out), env_manager="local")
    [pred] = json.loads(out.read_text())["predictions"]
    assert pred["label"] in ["class0", "class1", "class2"] and 0 < pred["prob"] <= 1
    assert pred["abstain"] is False and pred["present"] == ["text"]


def test_the_train_flows_import_no_ray_until_a_sweep_runs_on_ray():
    """prefect-ray registers a lazy ``ray`` module when imported; the first ``inspect.getmodule`` in the process
    (torch's optimizer imports torch._dynamo, which calls it) then loads all of Ray. Only a Ray sweep imports it."""
    import subprocess
    import sys

    code = ("import sys, flows.cli, flows.pipeline; from flows.runners import sweep_task_runner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'prefect_ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


def test_a_local_model_folder_is_fingerprinted_without_transformers(tiny_hf):
    """An extraction with nothing to encode checks its views against ``encoder_fingerprint``: for a model folder
    outside the hub cache, that reads the folder's files and imports no transformers (same fingerprint as the
    loaded encoder's: tests/test_encoders.py)."""
    import subprocess
    import sys

    code = ("import sys; from models.config import EncoderConfig; from stores.encoders import encoder_fingerprint; "
            f"fp = encoder_fingerprint('text', EncoderConfig(kind='hf', model={str(tiny_hf['text'])!r})); "
            "print(fp['revision'], 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    revision, imported = out.stdout.split()
    assert revision != "unknown" and imported == "False"


def test_the_collector_is_paused_for_the_imports_and_on_for_the_work():
    """flows.collector in a fresh interpreter: no full collection while the command's modules are imported, what
    they built frozen (later collections skip it), the collector back on for the work, where cyclic garbage is
    still collected, and the heap frozen when the command ends (the interpreter's exit walks no more of it)."""
    import subprocess
    import sys

    code = """
import gc, weakref
from flows import collector
full = []
gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2 and full.append(1))
with collector.running():
    paused = not gc.isenabled()
    collector.imported("torch", "lancedb")
    during, frozen = len(full), gc.get_freeze_count()
    class Node: pass
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    print(paused, during, frozen > 100_000, gc.isenabled(), gone() is None)
print(gc.isenabled(), gc.get_freeze_count() > frozen)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["True", "0", "True", "True", "True", "True", "True"], out.stdout + out.stderr


def test_the_mm_script_runs_commands_under_the_collector_policy(colour_store, tmp_path):
    """The installed ``mm`` is ``flows.cli:run`` (``main`` under flows.collector's policy), and a command run
    through it answers as ``main`` does: a query's neighbours as JSON, exit 0."""
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    import yaml

    assert entry_points(group="console_scripts")["mm"].value == "flows.cli:run"
    path = tmp_path / "colours.yaml"
    path.write_text(yaml.safe_dump(colour_store[0].model_dump(mode="json")))
    out = subprocess.run([str(Path(sys.executable).parent / "mm"), "query", "-c", str(path), "--id", "s006",
                          "--modality", "image", "-k", "3", "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["neighbours"]
    assert len(hits) == 3 and "s006" not in [h["id"] for h in hits]
