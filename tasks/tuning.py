"""Tuning task: one head's equal-budget Optuna study (logic in runs/tune.py)."""
from __future__ import annotations

from prefect import get_run_logger, task

from models.config import ExperimentConfig
from models.records import TuneResult
from runs.tune import run_tuning
from stores.features.feature_store import open_store


@task(name="tune-head")
def tune_head(cfg: ExperimentConfig, head: str, source_config: str | None = None) -> TuneResult:
    """Tune ``head``: the best validation score, parameters, --set overrides, the tuned YAML path and the trials."""
    result = run_tuning(cfg, head, open_store(cfg), source_config)
    get_run_logger().info("%s: best val %.4f with %s", head, result.best_value, result.best_params)
    return result
