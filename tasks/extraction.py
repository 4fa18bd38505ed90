"""Extraction and versioning tasks."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from models.config import ExperimentConfig
from stores import versioning
from stores.extraction import extract
from .common import retry_transient


@task(name="extract-features", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def extract_features(cfg: ExperimentConfig, max_rows: int | None = None) -> dict:
    """Resumable: a retry (or rerun) continues where the last attempt stopped."""
    return extract(cfg, progress=True, max_rows=max_rows).as_dict()


@task(name="version-store", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def version_store(cfg: ExperimentConfig, push: bool = True) -> dict:
    """``dvc add <top folder of store.root>`` in ``store.dvc_repo`` (and push to the configured remote);
    returns the DVC hash for lineage. A store on object storage is not under DVC: its versions are the Lance
    table versions (each run's ``lineage.version.*`` tags; ``store.versions`` pins them)."""
    if not isinstance(cfg.store.root, Path):
        return {"dvc": f"not used: store.root {cfg.store.root} is on object storage, versioned by its Lance table "
                       "versions (pin them with store.versions); DVC versioning applies to a local store.root"}
    repo_path = Path(cfg.store.dvc_repo).resolve()
    try:
        data_dir = Path(cfg.store.root).resolve().relative_to(repo_path).parts[0]
    except ValueError:
        raise ValueError(f"store.root {cfg.store.root} is not inside store.dvc_repo {repo_path}") from None
    versioning.ensure_repo(repo_path, cfg.store.dvc_remote, cfg.store.dvc_remote_options)
    md5 = versioning.track(repo_path, data_dir)
    if push:
        versioning.push(repo_path, data_dir)
    return {"dvc_hash": md5, "data_dir": data_dir}
