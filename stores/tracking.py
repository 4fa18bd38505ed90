"""The one module that talks to MLflow: runs, params, metrics, lineage, artifacts, registry, champion alias."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from mlflow.tracking import MlflowClient

from models.config import ExperimentConfig, TrackingConfig
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


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///relative/path`` with its path resolved against the working directory; other URIs as given."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def experiment_name(cfg: TrackingConfig, dataset: str) -> str:
    """``tracking.experiment``, else the dataset name."""
    return cfg.experiment or dataset


def tracking_target(cfg: TrackingConfig, dataset: str) -> str:
    """Where a run lands: the backend URI with a relative sqlite or folder path resolved, and the experiment.
    Part of the training cache key, so a result cached for one tracking store (another clone, a reset
    ``mlruns/``, another server) is not answered in another, where its run does not exist."""
    uri = absolute_sqlite_uri(cfg.uri)
    if "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()
    return f"{uri}#{experiment_name(cfg, dataset)}"


def artifact_uri(cfg: TrackingConfig) -> str:
    """``artifact_root`` as a URI: object-store URIs (s3://...) as given, folders resolved to file:// URIs."""
    root = str(cfg.artifact_root)
    if "://" in root:
        return root
    return Path(root).resolve().as_uri()


class Tracker:
    """One experiment (named ``tracking.experiment``, else the dataset name) in the configured backend."""

    def __init__(self, cfg: TrackingConfig, dataset: str):
        self.cfg, self.dataset = cfg, dataset
        check_reachable(cfg)
        mlflow.set_tracking_uri(_uri(cfg))
        self.client = MlflowClient(_uri(cfg))
        self.experiment_name = experiment_name(cfg, dataset)
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = f"{artifact_uri(cfg).rstrip('/')}/{self.experiment_name}"
            self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id

    def has_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is a live (not deleted) run of this experiment."""
        from mlflow.exceptions import MlflowException
        try:
            info = self.client.get_run(run_id).info
        except MlflowException:
            return False
        return info.experiment_id == self.experiment_id and info.lifecycle_stage == "active"

    def model_name(self, head: str) -> str:
        """Registered model name: ``<dataset name>-<head>``."""
        return f"{self.dataset}-{head}"

    # ------------------------------------------------------------------ logging
    @contextmanager
    def live_run(self, cfg: ExperimentConfig, extra_tags: dict[str, str] | None = None) -> Iterator["LiveRun"]:
        """Open the MLflow run BEFORE training (true start time and duration, live epoch curves in the UI);
        ``LiveRun.log_epoch`` logs each epoch as it ends, ``LiveRun.finish`` the results and the model. An
        exception marks the run FAILED and registers nothing."""
        name = f"{cfg.head.name}-{cfg.train_pattern.key}-s{cfg.seed}"
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name) as run:
            mlflow.log_params(cfg.flat())
            mlflow.set_tags({"head": cfg.head.name, "train_pattern": cfg.train_pattern.key, "seed": str(cfg.seed),
                             "dataset_name": self.dataset, **(extra_tags or {})})
            yield LiveRun(self, run.info.run_id)

    def log_run(self, result: RunResult, extra_tags: dict[str, str] | None = None) -> str:
        """Log an already finished run (e.g. from a benchmark): epochs, results and model in one go."""
        with self.live_run(result.config, extra_tags) as run:
            for row in result.fit.history:
                run.log_epoch(row)
            run.finish(result)
            return run.run_id

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

    # ------------------------------------------------------------------ registry
    def register(self, name: str, info, run_id: str) -> int:
        """A new version of registered model ``name`` from a logged model. Through the client, which (unlike
        ``registered_model_name=``) prints no "Successfully registered" lines: the CLI shows the champions."""
        from mlflow.exceptions import MlflowException
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return int(self.client.create_model_version(name, info.model_uri, run_id=run_id,
                                                    model_id=info.model_id).version)

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


class LiveRun:
    """An open MLflow run of one training task."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def log_epoch(self, row: dict) -> None:
        """``train/<name>`` metrics of one epoch at step = epoch, as the epoch ends."""
        mlflow.log_metrics({f"train/{k}": float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]),
                           run_id=self.run_id)

    def finish(self, result: RunResult) -> None:
        """Lineage tags, the dataset input, scenario metrics, artifacts and the (registered) model."""
        store, tracker = result.store, self.tracker
        mlflow.set_tags({"head_variant": result.variant, "store": store["name"],
                         "store_fingerprint": store["fingerprint"], "dataset_version": store["dataset_version"],
                         "lance_version": str(store["lance_version"]), **store.get("lineage", {})})
        dataset = mlflow.data.meta_dataset.MetaDataset(
            source=mlflow.data.http_dataset_source.HTTPDatasetSource(url=f"lance://{store['name']}"),
            name=store["name"], digest=store["fingerprint"])
        mlflow.log_input(dataset, context="training")
        mlflow.log_metrics(result.scalar_metrics())
        with tempfile.TemporaryDirectory() as tmp:
            tracker._artifacts(result, Path(tmp))
            mlflow.log_artifacts(tmp)
        from .mlflow_model import log_head_model
        info = log_head_model(result)
        if tracker.cfg.register_models:
            tracker.register(tracker.model_name(result.config.head.label), info, self.run_id)


def load_predictor(model_uri: str, tracking: TrackingConfig):
    """A Predictor from a registered model, e.g. ``models:/fashion-mmp@champion``."""
    mlflow.set_tracking_uri(_uri(tracking))
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor


def run_results(tracking: TrackingConfig, experiment: str, metric: str = "acc") -> list[dict]:
    """Finished runs of ``experiment`` in the shape the training task returns (variant, train pattern, seed,
    scenarios, summary): the input of the one table builder, ``stores.reporting.aggregate``."""
    mlflow.set_tracking_uri(_uri(tracking))
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'")
    out = []
    prefix = f"metrics.test/{metric}/"
    for _, r in runs.iterrows():
        scenarios = {c.removeprefix(prefix): {metric: float(r[c])} for c in runs.columns
                     if c.startswith(prefix) and pd.notna(r[c])}
        if not scenarios:
            continue
        summary = {c.removeprefix("metrics.summary/"): float(r[c]) for c in runs.columns
                   if c.startswith("metrics.summary/") and pd.notna(r[c])}
        out.append({"run_id": r["run_id"], "variant": r.get("tags.head_variant") or r.get("tags.head"),
                    "train_pattern": r.get("tags.train_pattern"), "seed": r.get("tags.seed"),
                    "scenarios": scenarios, "summary": summary})
    return out


def compare_table(tracking: TrackingConfig, experiment: str, metric: str = "acc") -> pd.DataFrame:
    """Paper-style table of the experiment's runs: one row per (head, train pattern), one column per scenario
    and the grid mean, mean ± sd over seeds (the same builder as the sweep report)."""
    from .reporting import aggregate, cell, columns
    scenarios, rows = aggregate(run_results(tracking, experiment, metric), metric)
    return pd.DataFrame([{c: r[c] if c == "seeds" else cell(r.get(c, "")) for c in columns(scenarios, rows)}
                         for r in rows])


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no runs)"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)



# ---------------------------------------------------------------------- store lineage (reproduce, gc)
LINEAGE_VERSION = "lineage.version."


def logged_run(tracking: TrackingConfig, run_id: str) -> dict:
    """A logged run's config (its ``config.yaml`` artifact), the store versions it read (``lineage.version.*``
    tags) and its metrics."""
    client = MlflowClient(_uri(tracking))
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp,
                                                   tracking_uri=_uri(tracking))
        config = yaml.safe_load(Path(path).read_text())
    versions = {k.removeprefix(LINEAGE_VERSION): int(v) for k, v in run.data.tags.items()
                if k.startswith(LINEAGE_VERSION)}
    return {"config": config, "versions": versions, "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}


def pinned_store_versions(tracking: TrackingConfig) -> list[dict]:
    """For each registered model version: the Lance tables and versions its run read, as
    ``{"model", "version", "run_id", "tables": {table: version}}``."""
    client = MlflowClient(_uri(tracking))
    out = []
    for mv in client.search_model_versions():  # every registered model's versions (no filter to quote)
        if mv.run_id:
            tags = client.get_run(mv.run_id).data.tags
            names = {"dataset": tags.get("lineage.dataset_table")}
            names.update({k.removeprefix("lineage.view."): v for k, v in tags.items() if k.startswith("lineage.view.")})
            tables = {names[p]: int(v) for p, v in ((k.removeprefix(LINEAGE_VERSION), v) for k, v in tags.items()
                                                    if k.startswith(LINEAGE_VERSION)) if names.get(p)}
            out.append({"model": mv.name, "version": int(mv.version), "run_id": mv.run_id, "tables": tables})
    return out
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
    return mlflow.search_runs(experiment_names=[experiment_name(cfg, experiment)],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def log_tables_run(cfg: TrackingConfig, experiment: str, name: str, tables: dict[str, str],
                   metrics: dict[str, float], params: dict | None = None, tags: dict[str, str] | None = None) -> str:
    """One run holding benchmark tables (Markdown artifacts, file name -> text) and their numbers as metrics."""
    run_id = start_parent_run(cfg, experiment, name, params, tags)
    end_parent_run(cfg, run_id, metrics, tables)
    return run_id
