"""Tuning task: one head's equal-budget Optuna study (logic in runs/tune.py)."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from models.config import ExperimentConfig
from models.records import TuneResult
from runs.tune import run_tuning
from stores.config_files import load_tuned, with_tree
from stores.features.feature_store import open_store


@task(name="tune-head")
def tune_head(cfg: ExperimentConfig, head: str, source_config: str | None = None) -> TuneResult:
    """Tune ``head``: the best validation score, parameters, --set overrides, the tuned YAML path and the trials."""
    result = run_tuning(cfg, head, open_store(cfg), source_config)
    get_run_logger().info("%s: best val %.4f with %s", head, result.best_value, result.best_params)
    return result


def tuned_sweep(grid: list[ExperimentConfig]) -> list[ExperimentConfig]:
    """``sweep.tune_first``: each distinct head of ``grid`` tuned with the tune section's budget (``tune_head``,
    its YAML written as ``mm tune`` writes it), then ``grid`` with each head's tuned settings (its runs named
    ``-tuned``)."""
    heads = {c.head.model_dump_json(): c for c in grid}
    tuned = {key: load_tuned(Path(tune_head(c, c.head.name).path)) for key, c in heads.items()}
    return [with_tree(c, tuned[c.head.model_dump_json()]) for c in grid]
