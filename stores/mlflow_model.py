"""The registered model format: an MLflow pyfunc that classifies raw samples with any modalities missing.
(Part of the MLflow boundary: only tracking.py imports this module.)"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch
import yaml

from models.config import ExperimentConfig


class MissingRobustClassifier(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with one column per modality: a path (image/audio) or text, None when missing)."""

    def load_context(self, context) -> None:
        from models.heads import ModalitySpec, build_head
        from .predict import Predictor
        from .runner import load_backbones

        cfg = ExperimentConfig.model_validate(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        extras = torch.load(context.artifacts["state"], map_location="cpu", weights_only=False)
        spec = ModalitySpec(**extras["spec"])
        from models.heads.base import HEADS

        head = build_head(cfg.head, spec, load_backbones(cfg, meta, HEADS[cfg.head.name].build))
        head.load_state_dict(extras["state_dict"])
        cfg.train.device = "cpu" if not torch.cuda.is_available() else cfg.train.device
        self.predictor = Predictor(cfg, head, meta)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        samples = model_input.astype(object).where(model_input.notna(), None).to_dict("records")
        return pd.DataFrame(self.predictor.predict(samples))


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


def log_head_model(result, registered_name: str | None) -> None:
    from mlflow.models import infer_signature
    from dataclasses import asdict

    mods = list(result.store["encoders"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(result.config.model_dump(mode="json")))
        meta_path = Path(result.config.store.root) / f"{result.store['name']}.json"
        (tmp / "meta.json").write_text(meta_path.read_text())
        spec = asdict(result.head.spec)
        torch.save({"state_dict": result.head.state_dict(), "spec": spec}, tmp / "state.pt")
        example = pd.DataFrame([{m: "path-or-text" for m in mods}, {m: None for m in mods}])
        out = pd.DataFrame([{"label": "class", "prob": 1.0, "present": ["m"]}])
        mlflow.pyfunc.log_model(name="model", python_model=MissingRobustClassifier(),
                                artifacts={"config": str(tmp / "config.yaml"), "meta": str(tmp / "meta.json"),
                                           "state": str(tmp / "state.pt")},
                                signature=infer_signature(example.astype(str), out[["label", "prob"]]),
                                pip_requirements=serving_requirements(),
                                registered_model_name=registered_name)
