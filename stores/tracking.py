"""The one module that talks to MLflow: runs, params, metrics, lineage, artifacts, registry, champion alias."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from mlflow.tracking import MlflowClient

from models.config import TrackingConfig
from .health import wait_healthy
from .runner import RunResult

CHAMPION = "champion"


# bounded client retries: a server that goes away mid-run fails the run in about a minute, not after hours
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_reachable(cfg: TrackingConfig) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer ``/health`` within
    ``connect_timeout_s``. File and sqlite backends need no server."""
    if cfg.uri.startswith(("http://", "https://")):
        wait_healthy(cfg.uri.rstrip("/") + "/health", cfg.connect_timeout_s, "MLflow tracking server",
                     "start it, or set tracking.uri to a sqlite:/// path. The feature store is untouched")


def _uri(cfg: TrackingConfig) -> str:
    if cfg.uri.startswith("sqlite:///") and not cfg.uri.startswith("sqlite:////"):
        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return cfg.uri


class Tracker:
    def __init__(self, cfg: TrackingConfig, dataset: str):
        self.cfg = cfg
        check_reachable(cfg)
        mlflow.set_tracking_uri(_uri(cfg))
        self.client = MlflowClient(_uri(cfg))
        self.experiment_name = cfg.experiment or dataset
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            root = Path(cfg.artifact_root).resolve() / self.experiment_name
            self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=root.as_uri())
        else:
            self.experiment_id = exp.experiment_id

    # ------------------------------------------------------------------ logging
    def log_run(self, result: RunResult, extra_tags: dict[str, str] | None = None) -> str:
        cfg, store = result.config, result.store
        name = f"{cfg.head.name}-{cfg.train_pattern.key}-s{cfg.seed}"
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name) as run:
            mlflow.log_params(cfg.flat())
            mlflow.set_tags({"head": cfg.head.name, "head_variant": result.variant,
                             "train_pattern": cfg.train_pattern.key, "seed": str(cfg.seed),
                             "store": store["name"], "store_fingerprint": store["fingerprint"],
                             "dataset_version": store["dataset_version"], "lance_version": str(store["lance_version"]),
                             **(extra_tags or {})})
            dataset = mlflow.data.meta_dataset.MetaDataset(
                source=mlflow.data.http_dataset_source.HTTPDatasetSource(url=f"lance://{store['name']}"),
                name=store["name"], digest=store["fingerprint"])
            mlflow.log_input(dataset, context="training")
            for row in result.fit.history:
                mlflow.log_metrics({f"train/{k}": float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            mlflow.log_metrics(result.scalar_metrics())
            with tempfile.TemporaryDirectory() as tmp:
                self._artifacts(result, Path(tmp))
                mlflow.log_artifacts(tmp)
            self._log_model(result, run.info.run_id)
            return run.info.run_id

    def _artifacts(self, result: RunResult, out: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        (out / "config.yaml").write_text(yaml.safe_dump(result.config.model_dump(mode="json"), sort_keys=False))
        rows = [{"scenario": s.slug, "pattern": s.pattern.key, **{k: v for k, v in s.metrics.items()
                                                                  if isinstance(v, float)}} for s in result.scenarios]
        pd.DataFrame(rows).to_csv(out / "scenarios.csv", index=False)
        (out / "per_class.json").write_text(json.dumps({s.slug: s.metrics.get("per_class_f1") for s in result.scenarios}))
        key = next(k for k in ("acc", "auroc", "f1_macro") if k in result.scenarios[0].metrics)
        mods = result.store["encoders"].keys()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in mods:
            pts = [(0.0, result.scenarios[0].metrics[key])] + [
                (s.pattern.rates[m], s.metrics[key]) for s in result.scenarios
                if s.pattern.kind == "per_modality" and m in s.pattern.rates]
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=f"{m} missing")
        ax.set(xlabel="test missing rate (%)", ylabel=key, title=f"{result.variant}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "robustness_curve.png", dpi=110)
        plt.close(fig)
        complete = result.scenarios[0].metrics
        if "per_class_f1" in complete:
            fig, ax = plt.subplots(figsize=(max(5, len(complete["per_class_f1"]) * 0.3), 3.5))
            ax.bar(range(len(complete["per_class_f1"])), complete["per_class_f1"])
            ax.set(xlabel="class", ylabel="F1 (complete test)")
            fig.tight_layout()
            fig.savefig(out / "per_class_f1.png", dpi=110)
            plt.close(fig)
        if "confusion" in complete:
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.imshow(np.asarray(complete["confusion"]), cmap="Blues")
            ax.set(xlabel="predicted", ylabel="true", title="confusion (complete test)")
            fig.tight_layout()
            fig.savefig(out / "confusion_matrix.png", dpi=110)
            plt.close(fig)
        for name, table in result.mask_tables.items():  # the presence masks this run saw
            pq.write_table(table, out / f"masks_{name}.parquet")

    def _log_model(self, result: RunResult, run_id: str) -> None:
        from .mlflow_model import log_head_model

        name = f"{result.store['name'].split('-')[0]}-{result.config.head.name}"
        log_head_model(result, registered_name=name if self.cfg.register_models else None)

    # ------------------------------------------------------------------ registry
    def update_champion(self, model_name: str, metric: str = "summary/grid_mean_acc") -> dict | None:
        """Alias ``champion`` to the registered version whose run has the best ``metric``."""
        versions = self.client.search_model_versions(f"name = '{model_name}'")
        scored = []
        for v in versions:
            value = self.client.get_run(v.run_id).data.metrics.get(metric)
            if value is not None:
                scored.append((value, int(v.version)))
        if not scored:
            return None
        best, version = max(scored)
        self.client.set_registered_model_alias(model_name, CHAMPION, str(version))
        return {"model": model_name, "version": version, metric: best}

    def runs(self, filter_string: str = "") -> pd.DataFrame:
        return mlflow.search_runs([self.experiment_id], filter_string=filter_string)


def load_predictor(model_uri: str, tracking: TrackingConfig):
    """A Predictor from a registered model, e.g. ``models:/fashion-mmp@champion``."""
    mlflow.set_tracking_uri(_uri(tracking))
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor


def compare_table(tracking: TrackingConfig, experiment: str, metric: str = "acc") -> pd.DataFrame:
    """Paper-style table: one row per (head, train pattern), one column per scenario, mean +- sd over seeds."""
    mlflow.set_tracking_uri(_uri(tracking))
    runs = mlflow.search_runs(experiment_names=[experiment])
    if runs.empty:
        return runs
    cols = sorted(c for c in runs.columns if c.startswith(f"metrics.test/{metric}/"))
    runs = runs.rename(columns={"tags.head_variant": "head", "tags.train_pattern": "train_pattern"})
    g = runs.groupby(["head", "train_pattern"])[cols]
    mean, sd, n = g.mean(), g.std().fillna(0.0), g.size()
    table = pd.DataFrame(index=mean.index)
    for c in cols:
        table[c.removeprefix(f"metrics.test/{metric}/")] = [f"{m * 100:.1f} ± {s * 100:.1f}"
                                                            for m, s in zip(mean[c], sd[c])]
    table["seeds"] = n
    return table.reset_index()


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no runs)"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)



# ---------------------------------------------------------------------- tuning and protocol tables (new API)
def _scalar_params(params: dict) -> list:
    from mlflow.entities import Param
    return [Param(str(k), str(v)[:6000]) for k, v in params.items()]


def start_parent_run(cfg: TrackingConfig, experiment: str, name: str, params: dict | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Open a parent run (e.g. one tuning study) in ``experiment``; returns its id. Children attach with
    ``log_child_run``; close it with ``end_parent_run``."""
    tracker = Tracker(cfg, experiment)
    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags=tags or {})
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
    mlflow.set_tracking_uri(_uri(cfg))
    client = MlflowClient(_uri(cfg))
    now = int(_time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for fname, text in (texts or {}).items():
        client.log_text(parent_id, text, fname)
    client.set_terminated(parent_id, status=status)


def child_runs(cfg: TrackingConfig, experiment: str, parent_id: str) -> pd.DataFrame:
    """The child runs of ``parent_id`` (params, metrics, tags as columns)."""
    mlflow.set_tracking_uri(_uri(cfg))
    return mlflow.search_runs(experiment_names=[cfg.experiment or experiment],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def log_tables_run(cfg: TrackingConfig, experiment: str, name: str, tables: dict[str, str],
                   metrics: dict[str, float], params: dict | None = None, tags: dict[str, str] | None = None) -> str:
    """One run holding benchmark tables (Markdown artifacts, file name -> text) and their numbers as metrics."""
    run_id = start_parent_run(cfg, experiment, name, params, tags)
    end_parent_run(cfg, run_id, metrics, tables)
    return run_id
