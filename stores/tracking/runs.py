"""The one module that talks to MLflow: runs, params, metrics, lineage, artifacts, registry, champion alias."""
from __future__ import annotations

import hashlib
import json
import os
import socket
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
from models.errors import first_line
from stores.health import wait_healthy
from models.records import Champion, RunResult, RunRow
from stores.tracking.predictor import Predictor

CHAMPION = "champion"
# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says it holds model training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LABELLED = {"name", "modality", "backbone"}  # head fields the head's label already shows


# bounded client retries: a server that goes away mid-run fails the run in about a minute, not after hours
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_reachable(cfg: TrackingConfig) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer ``/health`` within
    ``connect_timeout_s``. File and sqlite backends need no server."""
    if cfg.uri.startswith(("http://", "https://")):
        wait_healthy(cfg.uri.rstrip("/") + "/health", cfg.connect_timeout_s, "MLflow tracking server",
                     "start it, or set tracking.uri to a sqlite:/// path. The feature store is untouched")


def tracking_uri(cfg: TrackingConfig) -> str:
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


def run_name(cfg: ExperimentConfig) -> str:
    """Readable, and unique within a sweep: the head's label (``oracle-image``, ``moddrop-lora``, ``cmpt``) with
    any other head field set away from its default (``mmp+mask_p=0.5``), the train pattern, the seed, and
    ``tuned`` when the config is a tuned file (whose head fields that stands for)."""
    extra = ""
    if not cfg.tune.applied:
        changed = {k: v for k, v in cfg.head.model_dump(exclude_defaults=True).items() if k not in LABELLED}
        extra = "".join(f"+{k}={v}" for k, v in sorted(changed.items()))
        if len(extra) > 40:  # a long ablation: a digest keeps the name short and still distinct
            extra = "+" + hashlib.sha1(extra.encode()).hexdigest()[:8]
    return f"{cfg.head.label}{extra}-{cfg.train_pattern.key}-s{cfg.seed}" + ("-tuned" if cfg.tune.applied else "")


def runs_page(cfg: TrackingConfig, dataset: str, ui: str) -> str:
    """The MLflow UI page of the experiment's training runs. MLflow 3.17's UI takes the GenAI/model-training
    switch from the browser (default GenAI, whatever ``mlflow.experimentKind`` says) unless the URL sets
    ``workflowType``: this link opens on the runs in any browser."""
    exp = MlflowClient(tracking_uri(cfg)).get_experiment_by_name(experiment_name(cfg, dataset))
    page = f"#/experiments/{exp.experiment_id}/runs" if exp else "#/experiments"
    return f"{ui.rstrip('/')}/{page}?workflowType=machine_learning"


def artifact_uri(cfg: TrackingConfig) -> str:
    """``artifact_root`` as a URI: object-store URIs (s3://...) as given, folders resolved to file:// URIs."""
    root = str(cfg.artifact_root)
    if "://" in root:
        return root
    return Path(root).resolve().as_uri()


def owner_tags() -> dict[str, str]:
    """Which process a run belongs to: host, pid and the process's start time (a reused pid is another process)."""
    import psutil
    return {"host": socket.gethostname(), "pid": str(os.getpid()),
            "pid_started": f"{psutil.Process().create_time():.3f}"}


def _alive(tags: dict[str, str]) -> bool:
    import psutil
    try:
        return f"{psutil.Process(int(tags['pid'])).create_time():.3f}" == tags.get("pid_started")
    except (psutil.NoSuchProcess, ValueError):
        return False


def mark_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Runs still RUNNING whose process on this host is gone (killed, out of memory, the machine rebooted) end
    as KILLED, with a tag saying so: a run that looks alive is alive. Runs of other hosts are left alone."""
    host, dead = socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("host") == host and "pid" in tags and not _alive(tags):
            client.set_tag(run.info.run_id, "killed_reason", f"process {tags['pid']} on {host} ended without "
                                                              "closing the run (killed?); marked by a later command")
            client.set_terminated(run.info.run_id, "KILLED")
            dead.append(run.info.run_id)
    return dead


class Tracker:
    """One experiment (named ``tracking.experiment``, else the dataset name) in the configured backend."""

    def __init__(self, cfg: TrackingConfig, dataset: str):
        self.cfg, self.dataset = cfg, dataset
        check_reachable(cfg)
        mlflow.set_tracking_uri(tracking_uri(cfg))
        self.client = MlflowClient(tracking_uri(cfg))
        self.experiment_name = experiment_name(cfg, dataset)
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = f"{artifact_uri(cfg).rstrip('/')}/{self.experiment_name}"
            self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location,
                                                               tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():  # an experiment created before the tag existed
                if exp.tags.get(k) != v:
                    self.client.set_experiment_tag(self.experiment_id, k, v)
        self.killed = mark_dead_runs(self.client, self.experiment_id)

    def has_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is a live (not deleted) run of this experiment. Only "no such run" is False: any
        other tracking error (a locked database, a server hiccup) propagates, it must not read as a lost run
        and train a duplicate."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
        try:
            info = self.client.get_run(run_id).info
        except MlflowException as e:
            if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return False
            raise
        return info.experiment_id == self.experiment_id and info.lifecycle_stage == "active"

    def model_name(self, head: str) -> str:
        """Registered model name: ``<dataset name>-<head>``."""
        return f"{self.dataset}-{head}"

    # ------------------------------------------------------------------ logging
    @contextmanager
    def live_run(self, cfg: ExperimentConfig, extra_tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None) -> Iterator["LiveRun"]:
        """Open the MLflow run BEFORE training (true start time and duration, live epoch curves in the UI);
        ``LiveRun.log_epoch`` logs each epoch as it ends, ``LiveRun.finish`` the results and the model. An
        exception marks the run FAILED, tags its first line as ``failed_reason`` and registers nothing.
        ``parent_run_id``: the sweep's run it nests under."""
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name(cfg),
                              parent_run_id=parent_run_id) as run:
            mlflow.log_params(cfg.flat())
            mlflow.set_tags({"head": cfg.head.name, "train_pattern": cfg.train_pattern.key, "seed": str(cfg.seed),
                             "dataset_name": self.dataset, **owner_tags(), **(extra_tags or {})})
            try:
                yield LiveRun(self, run.info.run_id)
            except Exception as e:
                try:
                    mlflow.set_tag("failed_reason", f"{type(e).__name__}: {first_line(e)}")
                except Exception:  # noqa: BLE001 - the tracking store itself may be what failed: raise e, not this
                    pass
                raise

    def log_run(self, result: RunResult, extra_tags: dict[str, str] | None = None) -> str:
        """Log an already finished run (e.g. from a benchmark): epochs, results and model in one go."""
        with self.live_run(result.config, extra_tags) as run:
            for row, seconds in zip(result.fit.history, result.fit.epoch_seconds):
                run.log_epoch({**row, "seconds": seconds})
            run.finish(result)
            return run.run_id

    def _artifacts(self, result: RunResult, out: Path) -> None:
        # matplotlib's object API, not pyplot: no process-wide backend or figure registry, so concurrent
        # training tasks (threads) and a caller's own plots are left alone
        from matplotlib.figure import Figure

        (out / "config.yaml").write_text(yaml.safe_dump(result.config.model_dump(mode="json"), sort_keys=False))
        rows = [{"scenario": s.slug, "pattern": s.pattern.key, **{k: v for k, v in s.metrics.items()
                                                                  if isinstance(v, float)}} for s in result.scenarios]
        pd.DataFrame(rows).to_csv(out / "scenarios.csv", index=False)
        (out / "per_class.json").write_text(json.dumps({s.slug: s.metrics.get("per_class_f1") for s in result.scenarios}))
        key = next(k for k in ("acc", "auroc", "f1_macro") if k in result.scenarios[0].metrics)
        mods = result.store.encoders.keys()
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for m in mods:
            pts = [(0.0, result.scenarios[0].metrics[key])] + [
                (s.pattern.rates[m], s.metrics[key]) for s in result.scenarios
                if s.pattern.kind == "per_modality" and m in s.pattern.rates]
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=f"{m} missing")
        ax.set(xlabel="test missing rate (%)", ylabel=key, title=f"{result.variant}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "robustness_curve.png", dpi=110)
        complete = result.scenarios[0].metrics
        if "per_class_f1" in complete:
            fig = Figure(figsize=(max(5, len(complete["per_class_f1"]) * 0.3), 3.5))
            ax = fig.subplots()
            ax.bar(range(len(complete["per_class_f1"])), complete["per_class_f1"])
            ax.set(xlabel="class", ylabel="F1 (complete test)")
            fig.tight_layout()
            fig.savefig(out / "per_class_f1.png", dpi=110)
        if "confusion" in complete:
            fig = Figure(figsize=(5, 5))
            ax = fig.subplots()
            ax.imshow(np.asarray(complete["confusion"]), cmap="Blues")
            ax.set(xlabel="predicted", ylabel="true", title="confusion (complete test)")
            fig.tight_layout()
            fig.savefig(out / "confusion_matrix.png", dpi=110)
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

    def update_champion(self, model_name: str, metric: str = "summary/grid_mean_acc",
                        only_if_missing: bool = False) -> Champion | None:
        """Alias ``champion`` to the registered version whose run has the best ``metric``; with
        ``only_if_missing``, only where the model has no champion yet (``mm train``: a sweep's choice stays)."""
        if only_if_missing:
            from mlflow.exceptions import MlflowException
            try:
                self.client.get_model_version_by_alias(model_name, CHAMPION)
                return None
            except MlflowException:
                pass
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
        return Champion(model_name, version, metric, best)

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
        mlflow.set_tags({"head_variant": result.variant, "deviation": "+".join(result.deviations) or "none",
                         "store": store.name, "store_fingerprint": store.fingerprint,
                         "dataset_version": store.dataset_version, "lance_version": str(store.lance_version),
                         **store.lineage})
        dataset = mlflow.data.meta_dataset.MetaDataset(
            source=mlflow.data.http_dataset_source.HTTPDatasetSource(url=f"lance://{store.name}"),
            name=store.name, digest=store.fingerprint)
        mlflow.log_input(dataset, context="training")
        mlflow.log_metrics(result.scalar_metrics())
        with tempfile.TemporaryDirectory() as tmp:
            tracker._artifacts(result, Path(tmp))
            mlflow.log_artifacts(tmp)
        from stores.tracking.pyfunc import log_head_model
        info = log_head_model(result)
        if tracker.cfg.register_models:
            tracker.register(tracker.model_name(result.config.head.label), info, self.run_id)
            tracker.register(tracker.dataset, info, self.run_id)  # models:/<data.name>@champion: any head


def load_predictor(model_uri: str, tracking: TrackingConfig) -> Predictor:
    """A Predictor for a registered model, e.g. ``models:/fashion-mmp@champion``, rebuilt by this code from the
    model's artifacts (config, store metadata, weights), not from the code copy the model ships: a model
    registered by an earlier version of this project loads in this process all the same."""
    mlflow.set_tracking_uri(tracking_uri(tracking))  # a models:/ URI resolves in the registry, which follows it
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)) / "artifacts"
        return Predictor.from_files(root / "config.yaml", root / "meta.json", root / "state.pt")


def run_results(tracking: TrackingConfig, experiment: str, metric: str = "acc") -> list[RunRow]:
    """Finished runs of ``experiment`` as the rows the training task returns (variant, train pattern, seed,
    scenarios with ``metric`` only, summary): the input of the one table builder, ``runs.reporting.aggregate``."""
    mlflow.set_tracking_uri(tracking_uri(tracking))
    client = MlflowClient(tracking_uri(tracking))
    if exp := client.get_experiment_by_name(experiment):
        mark_dead_runs(client, exp.experiment_id)
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
        out.append(RunRow(variant=r.get("tags.head_variant") or r.get("tags.head"),
                          train_pattern=r.get("tags.train_pattern"), seed=r.get("tags.seed"), scenarios=scenarios,
                          summary=summary, run_id=r["run_id"]))
    return out
