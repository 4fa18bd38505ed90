"""A model registered by the code before the package layout changed (8d73ba0: ``stores/predict.py``,
``stores/mlflow_model.py``, ``stores/runner.py``) still loads and predicts: in this process through ``mm predict``
(rebuilt from its artifacts by today's code) and served by ``mlflow models serve`` (its own shipped code), with the
predictions the old code made. The fixture is the model folder as MLflow logged it, made by
``tests/fixtures/make_legacy_model.py`` from a checkout of 8d73ba0."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from conftest import DATASETS, served_model

FIXTURES = Path(__file__).parent / "fixtures"
SPEC = json.loads((FIXTURES / "legacy_model_8d73ba0.json").read_text())


def _requests() -> list[dict]:
    """The fixture's requests with image paths under this machine's datasets folder."""
    return [{m: (str(DATASETS / v) if m == "image" and v else v) for m, v in r.items()} for r in SPEC["requests"]]


def _same(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [list(g["present"]) for g in got] == [w["present"] for w in want]
    assert [g["prob"] for g in got] == pytest.approx([w["prob"] for w in want], abs=1e-5)


@pytest.fixture(scope="module")
def legacy_model(mlflow_db, tmp_path_factory):
    """The old model unpacked and registered as version 1 of ``fashion-early`` in a fresh sqlite registry."""
    from mlflow.tracking import MlflowClient
    tmp = tmp_path_factory.mktemp("legacy")
    with tarfile.open(FIXTURES / SPEC["tar"]) as tar:
        tar.extractall(tmp, filter="data")
    uri = mlflow_db(tmp / "mlflow.db")
    client = MlflowClient(uri)
    client.create_registered_model(SPEC["model_name"])
    client.create_model_version(SPEC["model_name"], str(tmp / "model"))
    return tmp / "model", uri


def test_old_model_ships_the_old_layout(legacy_model):
    """What makes this a real check: the model's own code is the layout this repository no longer has."""
    model, _ = legacy_model
    assert (model / "code" / "stores" / "predict.py").is_file() and (model / "code" / "stores" / "runner.py").is_file()
    assert not (Path(__file__).parents[1] / "stores" / "predict.py").exists()


def test_old_model_predicts_in_process_with_todays_code(legacy_model, capsys):
    from flows.cli import main
    from stores.tracking.runs import load_predictor
    from models.config import TrackingConfig
    _, uri = legacy_model
    predictor = load_predictor(f"models:/{SPEC['model_name']}/1", TrackingConfig(uri=uri))
    assert type(predictor).__module__ == "stores.tracking.predictor"  # today's code, not the shipped copy
    _same(predictor.predict(_requests()), SPEC["predictions"])
    main(["predict", "--json", "--model", f"models:/{SPEC['model_name']}/1", "--text", SPEC["requests"][0]["text"],
          "--set", f"tracking.uri={uri}"])
    _same(json.loads(capsys.readouterr().out), SPEC["predictions"][:1])


def test_old_model_serves_outside_the_repo(legacy_model, tmp_path):
    _, uri = legacy_model
    with served_model(f"models:/{SPEC['model_name']}/1", uri, tmp_path) as (invoke, *_):
        _same(invoke(_requests()), SPEC["predictions"])
