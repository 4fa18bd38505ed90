"""What a logged run read and how to read it back: its config and the store versions it pinned (``mm
reproduce``), and the versions every registered model's run pinned (``mm store gc`` keeps them)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from models.config import TrackingConfig
from models.records import LoggedRun
from stores.tracking.runs import tracking_uri

LINEAGE_VERSION = "lineage.version."


def logged_run(tracking: TrackingConfig, run_id: str) -> LoggedRun:
    """A logged run's config (its ``config.yaml`` artifact), the store versions it read (``lineage.version.*``
    tags) and its metrics."""
    client = MlflowClient(tracking_uri(tracking))
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp,
                                                   tracking_uri=tracking_uri(tracking))
        config = yaml.safe_load(Path(path).read_text())
    versions = {k.removeprefix(LINEAGE_VERSION): int(v) for k, v in run.data.tags.items()
                if k.startswith(LINEAGE_VERSION)}
    return LoggedRun(config, versions, dict(run.data.metrics), dict(run.data.tags))


def pinned_store_versions(tracking: TrackingConfig) -> list[dict]:
    """For each registered model version: the Lance tables and versions its run read, as
    ``{"model", "version", "run_id", "tables": {table: version}}``."""
    client = MlflowClient(tracking_uri(tracking))
    out = []
    for mv in client.search_model_versions():  # every registered model's versions (no filter to quote)
        if mv.run_id:
            tags = client.get_run(mv.run_id).data.tags
            names = {"dataset": tags.get("lineage.dataset_table")}
            names.update({k.removeprefix("lineage.view."): v for k, v in tags.items() if k.startswith("lineage.view.")})
            tables = {names[p]: int(v) for p, v in ((k.removeprefix(LINEAGE_VERSION), v) for k, v in tags.items()
                                                    if k.startswith(LINEAGE_VERSION)) if names.get(p)}
            out.append({"model": mv.name, "version": int(mv.version), "run_id": mv.run_id, "tables": tables})
    return out
