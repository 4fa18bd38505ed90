"""Helpers shared by the tasks: content-keyed cache keys and the retry condition."""
from __future__ import annotations

import hashlib
import json

from models.config import ConfigError, ExperimentConfig
from stores.datasets import DatasetError
from stores.feature_store import FeatureStore, StoreError, store_name
from stores.health import ServiceUnreachable

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


def content_key(cfg: ExperimentConfig, *extra: str) -> str:
    """Cache key from what determines a result: the store's fingerprint and the config's content (not paths
    or tracking settings)."""
    store = FeatureStore(cfg.store.root, store_name(cfg))
    fp = store.meta["fingerprint"] if store.meta_path.exists() else "no-store"
    body = cfg.model_dump(mode="json", exclude={"tracking": True, "store": {"root", "dvc_remote", "read_cache"},
                                                "data": {"data_dir"}, "schedule": True, "sweep": True,
                                                "tune": True})
    return hashlib.sha256(json.dumps([fp, body, *extra], sort_keys=True).encode()).hexdigest()
