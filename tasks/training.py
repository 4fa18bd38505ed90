"""Training, evaluation and registry tasks."""
from __future__ import annotations

import os

import torch
from prefect import get_run_logger, task

from models.config import ExperimentConfig
from stores.runner import train_and_evaluate
from stores.tracking import Tracker
from .common import content_key, retry_transient


def _train_key(context, parameters) -> str:
    return content_key(parameters["cfg"], "train")


@task(name="train-head", cache_key_fn=_train_key, persist_result=True, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def train_head(cfg: ExperimentConfig, threads: int | None = None, tags: dict[str, str] | None = None) -> dict:
    """Train one head (one pattern, one seed), evaluate the grid, log and register in MLflow."""
    if threads:
        torch.set_num_threads(threads)
    log = get_run_logger()
    tracker = Tracker(cfg.tracking, cfg.data.dataset)  # an unreachable tracking server fails before training
    result = train_and_evaluate(cfg, on_epoch=lambda row: log.debug("epoch %s", row))
    run_id = tracker.log_run(result, extra_tags=tags)
    log.info("%s: %s", result.variant, {k: round(v, 4) for k, v in result.summary.items()})
    return {"run_id": run_id, "head": cfg.head.name, "variant": result.variant, "seed": cfg.seed,
            "train_pattern": cfg.train_pattern.key, "summary": result.summary,
            "scenarios": {s.slug: {k: v for k, v in s.metrics.items() if isinstance(v, float)}
                          for s in result.scenarios}, "seconds": result.seconds}


@task(name="update-champions", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def update_champions(cfg: ExperimentConfig, heads: list[str], dataset: str, metric: str) -> list[dict]:
    """Alias ``champion`` on each ``<dataset>-<head>`` model: best ``summary/grid_mean_<metric>``."""
    tracker = Tracker(cfg.tracking, dataset)
    return [c for h in heads if (c := tracker.update_champion(f"{dataset}-{h}", f"summary/grid_mean_{metric}"))]


def threads_per_worker(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, parallel))
