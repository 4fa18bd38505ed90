"""Helpers shared by the tasks: content-keyed cache keys."""
from __future__ import annotations

import hashlib
import json

from models.config import ExperimentConfig
from stores.feature_store import FeatureStore, store_name


def content_key(cfg: ExperimentConfig, *extra: str) -> str:
    """Cache key from what determines a result: the store's fingerprint and the config's content (not paths
    or tracking settings)."""
    store = FeatureStore(cfg.store.root, store_name(cfg))
    fp = store.meta["fingerprint"] if store.meta_path.exists() else "no-store"
    body = cfg.model_dump(mode="json", exclude={"tracking": True, "store": {"root", "dvc_remote"},
                                                "data": {"data_dir"}, "schedule": True, "sweep": True})
    return hashlib.sha256(json.dumps([fp, body, *extra], sort_keys=True).encode()).hexdigest()
