"""The registered model format: an MLflow pyfunc that classifies raw samples with any modalities missing.
(Part of the MLflow boundary: only ``stores.tracking.runs`` imports this module.)

Logged as *models from code*: MLflow stores this file itself (not a pickle) plus the ``models/`` and ``stores/``
packages as code paths, and pins the project's third-party requirements, so the model loads and serves in an
environment where this repository is not installed (``mlflow models serve -m models:/<name>/<version>``).
Imports are absolute for that reason: MLflow runs this file as a standalone script."""
from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import torch
import yaml


class MissingRobustClassifier(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with one column per modality: a path (image/audio) or text, None when missing)."""

    def load_context(self, context) -> None:
        """The head and, at start rather than at the first request, its encoders. Server-side paths are read
        only under the folders in ``MM_SERVE_ROOTS`` (``:``-separated, none by default): clients send inline
        data (base64 bytes, text, audio samples). Concurrent requests are answered in micro-batches of up to
        ``MM_SERVE_MAX_BATCH`` samples (32; 1 runs each request alone); a batch smaller than the last one waits
        up to ``MM_SERVE_MAX_WAIT_MS`` (20) for the requests of the callers just answered."""
        import os

        from stores.tracking.batching import MicroBatcher
        from stores.tracking.predictor import Predictor

        a = context.artifacts
        roots = [Path(p) for p in os.environ.get("MM_SERVE_ROOTS", "").split(os.pathsep) if p]
        self.predictor = Predictor.from_files(a["config"], a["meta"], a["state"], roots=roots)
        for m in self.predictor.meta.modalities:
            self.predictor.encoder(m)
        self.batcher = MicroBatcher(self.predictor.predict, int(os.environ.get("MM_SERVE_MAX_BATCH", "32")),
                                    max_wait_s=float(os.environ.get("MM_SERVE_MAX_WAIT_MS", "20")) / 1000)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        samples = model_input.astype(object).where(model_input.notna(), None).to_dict("records")
        return pd.DataFrame(self.batcher.submit(samples))


mlflow.models.set_model(MissingRobustClassifier())

SERVING_EXCLUDES = {"prefect", "dvc", "fastapi", "sqlalchemy", "matplotlib", "tqdm"}  # not needed to predict


def serving_requirements() -> list[str]:
    """This project's runtime dependencies pinned to the installed versions. Given explicitly, MLflow skips
    inferring them, which loads the model in a subprocess (over 10 s a run)."""
    import importlib.metadata as md
    import re

    out = []
    for req in md.requires("mmrobust") or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
        if name.lower() not in SERVING_EXCLUDES:
            try:
                out.append(f"{name}=={md.version(name).split('+')[0]}")  # no local build tag (+cpu)
            except md.PackageNotFoundError:
                out.append(req)
    return out


def input_example(modalities: list[str]) -> pd.DataFrame:
    """One request row with the first modality missing (text where there is one, else a file path)."""
    row = {m: None for m in modalities}
    other = [m for m in modalities[1:]]
    if other:
        m = "text" if "text" in other else other[0]
        row[m] = "black leather shoes for men" if m == "text" else f"/path/to/{m}"
    return pd.DataFrame([row])


@contextlib.contextmanager
def requirements_unchecked():
    """Log a model without MLflow's check that the running environment satisfies its requirements: ours are
    the installed versions, read one call earlier (``serving_requirements``), so the check cannot find a
    mismatch, and it maps every installed distribution's files to modules first (1.3 s of each logged model).
    MLflow has no switch for it; the check is swapped out for the call, under a lock (trainings may share a
    process)."""
    import mlflow.utils.environment as env

    with _UNCHECKED_LOCK:
        check, env.warn_dependency_requirement_mismatches = env.warn_dependency_requirement_mismatches, _no_check
        try:
            yield
        finally:
            env.warn_dependency_requirement_mismatches = check


def _no_check(requirements: list[str]) -> None:
    return None


_UNCHECKED_LOCK = threading.Lock()


def _save_pyfunc(path, mlflow_model=None, validate_serving_input: bool = True, **kwargs):
    """``mlflow.pyfunc.save_model``, taking the ``validate_serving_input`` switch ``Model.log`` passes on to its
    flavor (``mlflow.pyfunc.save_model`` itself refuses the argument)."""
    return mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)


# ``mlflow.pyfunc`` as a flavor of ``Model.log`` that can decline the serving-input validation (see log_head_model)
PYFUNC_UNVALIDATED = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


def log_head_model(result):
    """Log the head of ``result`` to the active run; returns MLflow's ModelInfo.

    The input example is logged (``input_example.json`` and ``serving_input_example.json``: the MLflow UI and
    ``mlflow models serve`` show it), but not validated here: ``mlflow.pyfunc.log_model`` would load the model
    back, its encoders included, and predict the example in this process (4 s of a 200-row ``mm train``, for a
    failure it only logs as a warning). ``Model.log`` is what ``mlflow.pyfunc.log_model`` calls; its
    ``validate_serving_input=False`` is the switch MLflow's own transformers flavor uses to skip that load. The
    tests answer the stored example with the logged model instead (tests/test_fixed_costs.py,
    ``mlflow.models.predict``)."""
    from dataclasses import asdict

    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    import models
    import stores
    from stores.features.location import StoreLocation

    mods = list(result.store.encoders)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(result.config.model_dump(mode="json")))
        meta = StoreLocation.for_config(result.config.store).file(f"{result.store.name}.json")
        (tmp / "meta.json").write_text(meta.read_text())
        torch.save({"state_dict": result.head.state_dict(), "spec": asdict(result.head.spec),
                    "temperatures": result.temperatures}, tmp / "state.pt")
        signature = ModelSignature(inputs=Schema([ColSpec("string", m, required=False) for m in mods]),
                                   outputs=Schema([ColSpec("string", "label", required=False),
                                                   ColSpec("double", "prob", required=False),
                                                   ColSpec("boolean", "abstain"),
                                                   ColSpec("string", "reason", required=False)]))
        with requirements_unchecked():
            return Model.log(artifact_path=None, name="model", flavor=PYFUNC_UNVALIDATED,
                             flavor_name="pyfunc.ModelFromCode", validate_serving_input=False, python_model=__file__,
                             code_paths=[str(Path(p).parent) for p in (models.__file__, stores.__file__)],
                             artifacts={"config": str(tmp / "config.yaml"), "meta": str(tmp / "meta.json"),
                                        "state": str(tmp / "state.pt")},
                             signature=signature, input_example=input_example(mods),
                             pip_requirements=serving_requirements())
