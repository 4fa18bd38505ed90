"""The extraction flows, apart from the training ones so that ``mm extract`` imports neither MLflow, Ray nor
the training code (seconds of fixed cost on every run)."""
from __future__ import annotations

from prefect import flow

from models.config import ExperimentConfig
from models.records import Extraction
from tasks.extraction import extract_features, migrate_store, version_store


@flow(name="extract")
def extract_flow(config: ExperimentConfig, version: bool = True, max_rows: int | None = None,
                 use_record: bool = True) -> Extraction:
    """Extract features into the LanceDB store (resumable), then version it with DVC. ``use_record=False``: the
    caller has already asked the store's record (``mm extract``), so the extraction does not ask it again."""
    return Extraction(extract_features(config, max_rows=max_rows, use_record=use_record),
                      version_store(config) if version else None)


@flow(name="migrate")
def migrate_flow(config: ExperimentConfig) -> dict:
    """Convert an old-layout store into feature views (no re-encoding) and extract what is missing."""
    return migrate_store(config)
