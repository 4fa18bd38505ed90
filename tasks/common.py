"""Helpers shared by the tasks: the training cache key and the retry condition."""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path

from models.config import ConfigError, ExperimentConfig, runtime_fields
from stores.datasets import DatasetError
from stores.features.feature_store import FeatureStore, StoreError, store_name
from stores.features.location import StoreLocation, is_damage
from stores.health import ServiceUnreachable

PERMANENT = (ConfigError, DatasetError, StoreError, ServiceUnreachable)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry what a second attempt may fix, not a bad config, bad data, a store
    mismatch or lock, or a service that already failed its health wait."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception as e:
        return not is_damage(e)  # a damaged store file reads the same the second time
    return True


CODE_ROOT = Path(__file__).resolve().parents[1]
# the code that decides a trained result: the heads, the training loop, the missing patterns, masks and the splits
# under them, the feature transforms, the metrics, the run's own train/evaluate logic and the papers' constants its
# label is named against (not config loaders, tracking or the CLI)
DECIDING_CODE = ("models/heads", "models/training.py", "models/patterns.py", "models/features.py", "models/metrics.py",
                 "models/lora.py", "models/device.py", "models/paper.py", "runs/train.py", "stores/features/masks.py",
                 "stores/features/scenarios.py")


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=4)
def code_version(root: Path = CODE_ROOT) -> str:
    """The package version plus a hash of the syntax trees of ``DECIDING_CODE`` under ``root``: a fix there must
    not be answered from the cache of the old code, while a comment, a docstring or a change elsewhere keeps it."""
    try:
        version = importlib.metadata.version("mmrobust")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256(version.encode())
    for part in DECIDING_CODE:
        path = root / part
        for p in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = _without_docstrings(ast.parse(p.read_text(), str(p)))
            h.update(str(p.relative_to(root)).encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()


def content_key(cfg: ExperimentConfig, *extra: str) -> str:
    """Cache key from what determines a result: the store's fingerprint, the config without its runtime fields
    (``models.config.RUNTIME``) and the code version."""
    store = FeatureStore(StoreLocation.for_config(cfg.store), store_name(cfg))
    fp = store.meta.fingerprint if store.meta_path.exists() else "no-store"
    body = cfg.model_dump(mode="json", exclude=runtime_fields(type(cfg)))
    key = [fp, body, code_version(CODE_ROOT), *extra]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
