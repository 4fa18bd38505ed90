"""Evaluation task: a registered model on a config's scenario grid."""
from __future__ import annotations

from prefect import task

from models.config import ExperimentConfig
from models.records import Evaluation, scenario_scalars
from runs.train import evaluate
from stores.features.feature_store import open_store
from stores.tracking.runs import load_predictor

from .common import retry_transient


@task(name="evaluate-model", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def evaluate_model(cfg: ExperimentConfig, model_uri: str) -> Evaluation:
    """Test-split metrics of ``model_uri`` (e.g. ``models:/avmnist-mmp@champion``) under every evaluation pattern
    of ``cfg``, and their summary (grid mean, complete, area under each modality's curve)."""
    scenarios, summary = evaluate(cfg, load_predictor(model_uri, cfg.tracking).head, open_store(cfg))
    return Evaluation(model_uri, summary, scenario_scalars(scenarios))
