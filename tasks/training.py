"""Training, reproduction and registry tasks."""
from __future__ import annotations

import functools
import os
import time

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run as prefect_task_run

from models.config import ExperimentConfig
from models.metrics import primary_metric
from models.records import Champion, Reproduction, RunRow
from runs.reproduce import reproduce
from runs.train import train_and_evaluate
from stores import progress
from stores.features.feature_store import open_store
from stores.tracking.runs import Tracker, check_reachable, tracking_target

from .common import content_key, retry_transient


def _train_key(context, parameters) -> str:
    cfg = parameters["cfg"]
    return content_key(cfg, "train", tracking_target(cfg.tracking, cfg.data.dataset_name))


def run_label(cfg: ExperimentConfig) -> str:
    return f"{cfg.head.label} {cfg.train_pattern.key} s{cfg.seed}"


@task(name="train-head", cache_key_fn=_train_key, persist_result=True, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def train_head(cfg: ExperimentConfig, threads: int | None = None, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> RunRow:
    """Train one head (one pattern, one seed), evaluate the grid, log and register in MLflow. The MLflow run
    is open during training: epochs are logged live, and reported to the console's progress file.
    ``parent_run_id``: the sweep's run it nests under."""
    if threads:
        torch.set_num_threads(threads)
    log = get_run_logger()
    show = functools.partial(progress.report, run_label(cfg), started=time.time())  # the console's view
    store = open_store(cfg)  # a missing store fails before an MLflow run is opened
    tracker = Tracker(cfg.tracking, cfg.data.dataset_name)  # an unreachable tracking server fails before training
    show(state="starting", epoch=0, epochs=cfg.train.epochs)
    # a retried attempt opens a new run: the task-run id ties it to the FAILED one it follows
    attempt = {"prefect_task_run": str(prefect_task_run.id), "attempt": str(prefect_task_run.run_count)}
    with tracker.live_run(cfg, {**(tags or {}), **attempt}, parent_run_id) as run:
        def on_epoch(row: dict) -> None:
            run.log_epoch(row)
            metric = next((v for k, v in row.items() if k.startswith("val_") and "/" not in k), None)
            show(state="training", epoch=row["epoch"] + 1, epochs=cfg.train.epochs, val=metric)
            log.debug("epoch %s", row)

        result = train_and_evaluate(cfg, store, on_epoch=on_epoch)
        show(state="logging", epoch=result.fit.epochs_run, epochs=result.fit.epochs_run, val=result.fit.best_score)
        run.finish(result)
    show(state="done", epoch=result.fit.epochs_run, epochs=result.fit.epochs_run, val=result.fit.best_score,
         seconds=result.seconds)
    log.info("%s: %s", result.variant, {k: round(v, 4) for k, v in result.summary.items()})
    return result.row(run.run_id)


def train_all(configs: list[ExperimentConfig], threads: int | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> list[RunRow]:
    """``train_head`` over ``configs`` concurrently (on the flow's task runner). A result the cache answers
    with an MLflow run that is gone (the run deleted, the tracking database reset) is trained again, bypassing
    the cache: every returned ``run_id`` exists in the configured tracking store."""
    if not configs:
        return []
    results = [f.result() for f in [train_head.submit(c, threads=threads, tags=tags, parent_run_id=parent_run_id)
                                    for c in configs]]
    tracker = Tracker(configs[0].tracking, configs[0].data.dataset_name)
    stale = [i for i, r in enumerate(results) if not tracker.has_run(r.run_id)]
    if stale:
        get_run_logger().warning("%d cached training results had no MLflow run in %s: training them again",
                                 len(stale), tracking_target(configs[0].tracking, configs[0].data.dataset_name))
        again = train_head.with_options(refresh_cache=True)
        for i, f in zip(stale, [again.submit(configs[i], threads=threads, tags=tags, parent_run_id=parent_run_id)
                                for i in stale]):
            results[i] = f.result()
    return results


@task(name="open-experiment", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def open_experiment(cfg: ExperimentConfig) -> str:
    """Before a sweep: the tracking server reachable, the backend's schema and the experiment created once here
    (worker processes that all start on a fresh sqlite file race on its migrations), the store present. Returns
    the store's primary metric."""
    Tracker(cfg.tracking, cfg.data.dataset_name)
    return primary_metric(open_store(cfg).meta.task)


@task(name="check-tracking")
def check_tracking(cfg: ExperimentConfig) -> None:
    """Fail fast, before a long extraction or study, when the tracking server does not answer."""
    check_reachable(cfg.tracking)


@task(name="update-champions", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def update_champions(cfg: ExperimentConfig, heads: list[str], metric: str,
                     dataset_only_if_missing: bool = False) -> list[Champion]:
    """Alias ``champion`` on each ``<dataset name>-<head>`` model and on the dataset's own ``<dataset name>``
    model (every head's versions): best ``summary/grid_mean_<metric>``. ``dataset_only_if_missing``: leave an
    existing dataset champion (``mm train`` sets one only where there is none)."""
    if not cfg.tracking.register_models:
        return []
    tracker, key = Tracker(cfg.tracking, cfg.data.dataset_name), f"summary/grid_mean_{metric}"
    champions = [c for h in heads if (c := tracker.update_champion(tracker.model_name(h), key))]
    overall = tracker.update_champion(cfg.data.dataset_name, key, only_if_missing=dataset_only_if_missing)
    return champions + ([overall] if overall else [])


@task(name="reproduce-run", cache_policy=NO_CACHE)  # a reproduction always runs again
def reproduce_run(cfg: ExperimentConfig, run_id: str, overrides: list[str] | None = None) -> Reproduction:
    """``runs.reproduce.reproduce``: a logged run trained again on the store versions it read, metrics compared."""
    return reproduce(cfg, run_id, overrides)


def threads_per_worker(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, parallel))
