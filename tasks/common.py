"""Helpers shared by the tasks: content-keyed cache keys and the retry condition."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path

import models

from models.config import ConfigError, ExperimentConfig
from stores.datasets import DatasetError
from stores.feature_store import FeatureStore, StoreError, store_name
from stores.health import ServiceUnreachable
from stores.location import StoreLocation

PERMANENT = (ConfigError, DatasetError, StoreError, ServiceUnreachable)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry what a second attempt may fix, not a bad config, bad data, a store
    mismatch or lock, or a service that already failed its health wait."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception:
        return True
    return True


MODELS_DIR = Path(models.__file__).parent


@lru_cache(maxsize=4)
def code_version(root: Path) -> str:
    """The package version plus a hash of every source under ``models/`` (heads, training loop, metrics):
    a fix there must not be answered from the cache of the old code."""
    try:
        version = importlib.metadata.version("mmrobust")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256(version.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def content_key(cfg: ExperimentConfig, *extra: str) -> str:
    """Cache key from what determines a result: the store's fingerprint, the config's content (not paths
    or tracking settings) and the code version."""
    store = FeatureStore(StoreLocation.for_config(cfg.store), store_name(cfg))
    fp = store.meta["fingerprint"] if store.meta_path.exists() else "no-store"
    runtime = {"tracking": True, "schedule": True, "sweep": True, "ray": True, "tune": True, "data": {"data_dir"},
               "store": {"root", "storage_options", "cache_dir", "dvc_remote", "dvc_remote_options",
                         "read_cache"}}
    body = cfg.model_dump(mode="json", exclude=runtime)
    key = [fp, body, code_version(MODELS_DIR), *extra]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
