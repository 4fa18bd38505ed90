"""Parent runs with child runs (a tuning study and its trials, a sweep and its trainings) and runs that hold
benchmark tables."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from models.config import ExperimentConfig, TrackingConfig
from models.heads import parse_head_config
from stores.tracking.runs import Tracker, experiment_name, owner_tags, tracking_uri

NOTE = "mlflow.note.content"  # a run's description, shown as Markdown on its overview page


def _scalar_params(params: dict) -> list:
    from mlflow.entities import Param
    return [Param(str(k), str(v)[:6000]) for k, v in params.items()]


def start_parent_run(cfg: TrackingConfig, experiment: str, name: str, params: dict | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Open a parent run (e.g. one tuning study) in ``experiment``; returns its id. Children attach with
    ``log_child_run``; close it with ``end_parent_run``."""
    tracker = Tracker(cfg, experiment)
    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags={**owner_tags(), **(tags or {})})
    if params:
        tracker.client.log_batch(run.info.run_id, params=_scalar_params(params))
    return run.info.run_id


def log_child_run(cfg: TrackingConfig, experiment: str, parent_id: str, name: str, params: dict,
                  metrics: dict[str, float], curves: dict[str, dict[int, float]] | None = None,
                  tags: dict[str, str] | None = None, status: str = "FINISHED") -> str:
    """One finished child run (e.g. one trial) under ``parent_id``: params, final metrics and per-step curves."""
    import time as _time

    from mlflow.entities import Metric
    tracker = Tracker(cfg, experiment)
    run = tracker.client.create_run(tracker.experiment_id, run_name=name,
                                    tags={"mlflow.parentRunId": parent_id, **(tags or {})})
    now = int(_time.time() * 1000)
    points = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    points += [Metric(k, float(v), now, int(step)) for k, curve in (curves or {}).items() for step, v in curve.items()]
    tracker.client.log_batch(run.info.run_id, metrics=points, params=_scalar_params(params))
    tracker.client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def end_parent_run(cfg: TrackingConfig, parent_id: str, metrics: dict[str, float] | None = None,
                   texts: dict[str, str] | None = None, tags: dict[str, str] | None = None,
                   status: str = "FINISHED") -> None:
    """Final metrics, text artifacts (file name -> content) and tags of a parent run, then close it."""
    import time as _time

    from mlflow.entities import Metric, RunTag
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient(tracking_uri(cfg))
    now = int(_time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for fname, text in (texts or {}).items():
        client.log_text(parent_id, text, fname)
    client.set_terminated(parent_id, status=status)


def child_runs(cfg: TrackingConfig, experiment: str, parent_id: str) -> pd.DataFrame:
    """The child runs of ``parent_id`` (params, metrics, tags as columns)."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.search_runs(experiment_names=[experiment_name(cfg, experiment)],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def log_tables_run(cfg: TrackingConfig, experiment: str, name: str, tables: dict[str, str],
                   metrics: dict[str, float], params: dict | None = None, tags: dict[str, str] | None = None) -> str:
    """One run holding benchmark tables (Markdown artifacts, file name -> text) and their numbers as metrics."""
    run_id = start_parent_run(cfg, experiment, name, params, tags)
    end_parent_run(cfg, run_id, metrics, tables)
    return run_id


def start_sweep_run(cfg: ExperimentConfig, name: str, tags: dict[str, str] | None = None) -> str:
    """The parent run of a sweep, open while its trainings (nested under it) run: the grid as params, the
    whole config tree as an artifact."""
    sweep, dataset = cfg.sweep, cfg.data.dataset_name
    params = {"sweep.heads": ", ".join(sorted({parse_head_config(h).label for h in sweep.heads})),
              "sweep.train_patterns": ", ".join(p.key for p in sweep.train_patterns),
              "sweep.seeds": ", ".join(map(str, sweep.seeds)), "train.epochs": cfg.train.epochs,
              "eval.select_on": cfg.eval.select_on}
    run_id = start_parent_run(cfg.tracking, dataset, name, params,
                              {"kind": "sweep", "dataset_name": dataset, **(tags or {})})
    MlflowClient(tracking_uri(cfg.tracking)).log_text(
        run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
    return run_id


def end_sweep_run(cfg: TrackingConfig, run_id: str, report_dir: Path | None, description: str,
                  child_metrics: dict[str, dict[str, float]], failed: bool = False) -> None:
    """Close a sweep's parent run: its report folder (comparison table as Markdown and HTML, the robustness
    plot with every head) as artifacts, the table as its description, and the metrics only the whole sweep
    gives (``compare/gap_closed_<m>``) logged on each child run beside its own comparison metrics."""
    client = MlflowClient(tracking_uri(cfg))
    for child, metrics in child_metrics.items():
        for k, v in metrics.items():
            client.log_metric(child, k, float(v))
    if report_dir is not None:
        client.log_artifacts(run_id, str(report_dir))
    end_parent_run(cfg, run_id, tags={NOTE: description}, status="FAILED" if failed else "FINISHED")
