"""Extraction, migration and versioning tasks."""
from __future__ import annotations


from prefect import task

from models.config import ExperimentConfig
from models.records import ExtractReport, StoreVersion
from stores.extraction import extract
from stores.extraction.migrate import migrate_legacy
from stores.features import versioning

from .common import retry_transient


@task(name="extract-features", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def extract_features(cfg: ExperimentConfig, max_rows: int | None = None, use_record: bool = True) -> ExtractReport:
    """Resumable: a retry (or rerun) continues where the last attempt stopped."""
    return extract(cfg, progress=True, max_rows=max_rows, use_record=use_record)


@task(name="migrate-store", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def migrate_store(cfg: ExperimentConfig) -> dict:
    """Copy an old-layout store into feature views (no re-encoding), then extract what the views lack."""
    out = migrate_legacy(cfg)
    out["extract"] = extract(cfg, progress=False).as_dict()
    return out


@task(name="version-store", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def version_store(cfg: ExperimentConfig, push: bool = True) -> StoreVersion:
    """``dvc add`` (and ``dvc push``) the store's top folder; see ``stores.features.versioning.version_store``."""
    return versioning.version_store(cfg.store, push)
