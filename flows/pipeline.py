"""The Prefect flows: extract, train, evaluate, sweep and pipeline (extract -> sweep -> report)."""
from __future__ import annotations

import itertools

from prefect import flow, get_run_logger

from models.config import ExperimentConfig
from models.heads import parse_head_config
from models.metrics import primary_metric
from stores.feature_store import open_store
from stores.tracking import Tracker, check_reachable
from tasks.extraction import extract_features, version_store
from tasks.reporting import report
from tasks.training import train_all, update_champions
from flows.runners import sweep_task_runner, task_threads


@flow(name="extract")
def extract_flow(config: ExperimentConfig, version: bool = True, max_rows: int | None = None) -> dict:
    """Extract features into the LanceDB store (resumable), then version it with DVC."""
    out = extract_features(config, max_rows=max_rows)
    if version:
        out.update(version_store(config))
    return out


@flow(name="train")
def train_flow(config: ExperimentConfig) -> dict:
    """One head, one training pattern, one seed: train, evaluate the grid, register in MLflow."""
    return train_all([config])[0]


@flow(name="evaluate")
def evaluate_flow(config: ExperimentConfig, model_uri: str) -> dict:
    """Re-evaluate a registered model (e.g. models:/avmnist-mmp@champion) on the config's scenario grid."""
    from stores.tracking import load_predictor
    from stores.runner import evaluate_grid, scenario_scalars, summarize

    predictor = load_predictor(model_uri, config.tracking)
    store = open_store(config)
    scenarios = evaluate_grid(config, predictor.head, store)
    return {"model_uri": model_uri, "summary": summarize(scenarios, store.meta["task"], store.modalities, config.eval.test_rates),
            "scenarios": scenario_scalars(scenarios)}


def sweep_configs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """The grid heads x train patterns x seeds, each a full config."""
    out = []
    for head, pattern, seed in itertools.product(config.sweep.heads, config.sweep.train_patterns, config.sweep.seeds):
        out.append(config.model_copy(update={"head": parse_head_config(head), "train_pattern": pattern, "seed": seed}))
    return out


@flow(name="sweep")
def sweep_flow(config: ExperimentConfig, tags: dict[str, str] | None = None) -> dict:
    """Train the grid concurrently (at most ``sweep.max_parallel`` at once: one process each, so seeds stay
    deterministic and one GPU is not oversubscribed), alias champions, write the report."""
    log = get_run_logger()
    # reachable, and the backend's schema and the experiment created once here: worker processes that all
    # start on a fresh sqlite file race on its migrations
    Tracker(config.tracking, config.data.dataset_name)
    store = open_store(config)
    threads = task_threads(config)
    results = train_all(sweep_configs(config), threads, tags)
    metric = primary_metric(store.meta["task"])
    heads = sorted({c.head.label for c in sweep_configs(config)})
    champions = update_champions(config, heads, metric)
    path = report(results, config.data.dataset_name, metric)
    log.info("report: %s; champions: %s", path, champions)
    return {"results": results, "champions": champions, "report": path}


def run_sweep(config: ExperimentConfig, tags: dict[str, str] | None = None) -> dict:
    """``sweep_flow`` on ``sweep.runner``: a process pool of ``sweep.max_parallel`` workers, or Ray tasks with
    the ``ray`` section's resources (paths made absolute, so workers find the store and MLflow)."""
    config, runner = sweep_task_runner(config)
    return sweep_flow.with_options(task_runner=runner)(config, tags)


@flow(name="pipeline")
def pipeline_flow(config: ExperimentConfig, version: bool = True) -> dict:
    """extract -> DVC version -> sweep -> report, for one dataset."""
    check_reachable(config.tracking)  # before the long extraction, not after it
    extracted = extract_flow(config, version=version)
    swept = run_sweep(config, {"dvc_hash": extracted["dvc_hash"]} if "dvc_hash" in extracted else None)
    return {"extract": extracted, **swept}
