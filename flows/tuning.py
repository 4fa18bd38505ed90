"""The ``tune`` flow: the same Optuna budget for every head, chosen on the validation split only."""
from __future__ import annotations

from prefect import flow

from models.config import ExperimentConfig
from models.records import TuneResult
from tasks.training import check_tracking
from tasks.tuning import tune_head


@flow(name="tune")
def tune_flow(config: ExperimentConfig, source_config: str | None = None) -> dict[str, TuneResult]:
    """Tune ``tune.heads`` (default: the config's head) one after the other, each with ``tune.n_trials`` trials;
    write configs/tuned/<dataset>-<head>.yaml for each. ``source_config`` is the YAML the tuned files extend."""
    check_tracking(config)
    return {h: tune_head(config, h, source_config) for h in config.tune.heads or [config.head.name]}
