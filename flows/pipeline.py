"""The Prefect flows: train, reproduce, evaluate, sweep and pipeline (extract -> sweep -> report); extract and
migrate live in ``flows.extraction``, which imports neither MLflow, Ray nor the training code.
Every unit of work is a task (``tasks/``); flows compose them and never call the run logic directly."""
from __future__ import annotations

import itertools

from prefect import flow, get_run_logger

from flows.extraction import extract_flow, migrate_flow  # noqa: F401  (migrate_flow: re-exported)
from flows.runners import sweep_task_runner, task_threads
from models.config import ExperimentConfig
from models.heads import parse_head_config
from models.records import Evaluation, PipelineResult, Reproduction, RunRow, SweepResult, summary_metric
from tasks.evaluation import evaluate_model
from tasks.reporting import finish_sweep, report, start_sweep
from tasks.training import check_tracking, open_experiment, reproduce_run, train_all, update_champions
from tasks.tuning import tuned_sweep


@flow(name="train")
def train_flow(config: ExperimentConfig) -> RunRow:
    """One head, one training pattern, one seed: train, evaluate the grid, register in MLflow (and alias the
    dataset's champion when it has none, so ``models:/<data.name>@champion`` serves after any run)."""
    row = train_all([config])[0]
    update_champions(config, [], summary_metric(row.summary), dataset_only_if_missing=True)
    return row


@flow(name="reproduce")
def reproduce_flow(config: ExperimentConfig, run_id: str, overrides: list[str] | None = None) -> Reproduction:
    """Re-run a logged run on the store versions it read; its metrics beside the original's."""
    return reproduce_run(config, run_id, overrides)


@flow(name="evaluate")
def evaluate_flow(config: ExperimentConfig, model_uri: str) -> Evaluation:
    """Re-evaluate a registered model (e.g. models:/avmnist-mmp@champion) on the config's scenario grid."""
    return evaluate_model(config, model_uri)


def sweep_configs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """The grid heads x train patterns x seeds, each a full config."""
    out = []
    for head, pattern, seed in itertools.product(config.sweep.heads, config.sweep.train_patterns, config.sweep.seeds):
        out.append(config.model_copy(update={"head": parse_head_config(head), "train_pattern": pattern, "seed": seed}))
    return out


@flow(name="sweep")
def sweep_flow(config: ExperimentConfig, tags: dict[str, str] | None = None,
               configs: list[ExperimentConfig] | None = None) -> SweepResult:
    """Train the grid (or ``configs``: e.g. a protocol preset's runs) concurrently (at most ``sweep.max_parallel``
    at once: one process each, so seeds stay deterministic and one GPU is not oversubscribed), alias champions,
    write the report; in MLflow the sweep's parent run holds the report and its trainings nest under it."""
    log = get_run_logger()
    metric = open_experiment(config)
    parent = start_sweep(config, tags)  # the trainings nest under it in the MLflow UI
    try:
        configs = sweep_configs(config) if configs is None else configs
        results = train_all(configs, task_threads(config), tags, parent)
        heads = sorted({c.head.label for c in configs})
        champions = update_champions(config, heads, metric)
        path = report(results, config.data.dataset_name, metric)
    except BaseException:
        finish_sweep(config, parent, [], None, metric, failed=True)
        raise
    finish_sweep(config, parent, results, path, metric)
    log.info("report: %s; champions: %s", path, champions)
    return SweepResult(results, champions, path, parent)


def run_sweep(config: ExperimentConfig, tags: dict[str, str] | None = None,
              configs: list[ExperimentConfig] | None = None) -> SweepResult:
    """``sweep_flow`` on ``sweep.runner``: a process pool of ``sweep.max_parallel`` workers, or Ray tasks with
    the ``ray`` section's resources (paths made absolute, so workers find the store and MLflow); ``configs``:
    the runs to train instead of the config's sweep grid."""
    config, runner = sweep_task_runner(config)
    if configs is not None:
        configs = [sweep_task_runner(c)[0] for c in configs]  # the same paths as the sweep's own config
    return sweep_flow.with_options(task_runner=runner)(config, tags, configs)


@flow(name="pipeline")
def pipeline_flow(config: ExperimentConfig, version: bool = True) -> PipelineResult:
    """extract -> DVC version -> sweep -> report, for one dataset."""
    check_tracking(config)  # before the long extraction, not after it
    extracted = extract_flow(config, version=version)
    dvc_hash = extracted.version.dvc_hash if extracted.version else None
    configs = tuned_sweep(sweep_configs(config)) if config.sweep.tune_first else None
    swept = run_sweep(config, {"dvc_hash": dvc_hash} if dvc_hash else None, configs)
    return PipelineResult(extracted, swept)

