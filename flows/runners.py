"""Task runners for the sweep: a local process pool (the default) or a Ray cluster (``sweep.runner: ray``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from models.config import ExperimentConfig
from stores.datasets import datasets_root
from stores.ray_cluster import init_kwargs
from stores.tracking.runs import absolute_sqlite_uri
from tasks.training import threads_per_worker

if TYPE_CHECKING:
    from flows.ray_runner import ResourceRayTaskRunner


def absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """The config with the store, DVC repo, datasets folder, sqlite tracking database and artifact folder made
    absolute, so a task finds them from any working directory (a Ray worker's is not the driver's).
    ``data.manifest`` is left as written: it is part of the store's name."""
    cfg = config.model_copy(deep=True)
    if isinstance(cfg.store.root, Path):  # a URI (s3://...) is the same from every machine
        cfg.store.root = cfg.store.root.resolve()
    if cfg.store.cache_dir is not None:
        cfg.store.cache_dir = Path(cfg.store.cache_dir).resolve()
    cfg.store.dvc_repo = Path(cfg.store.dvc_repo).resolve()
    cfg.data.data_dir = datasets_root(cfg.data).resolve()
    cfg.tracking.uri = absolute_sqlite_uri(cfg.tracking.uri)
    if "://" not in cfg.tracking.artifact_root:
        cfg.tracking.artifact_root = str(Path(cfg.tracking.artifact_root).resolve())
    return cfg


def ray_task_runner(config: ExperimentConfig) -> ResourceRayTaskRunner:
    """A Ray task runner for ``config.ray``: a new local cluster (``num_cpus``, no dashboard) when ``address``
    is None, else the cluster at ``address``; an already initialized Ray in this process is reused as is.
    prefect-ray is imported here, not with this module: it puts a lazy ``ray`` module in ``sys.modules``, which
    the first ``inspect.getmodule`` (torch's optimizer imports torch._dynamo, which calls it) loads in full, over
    0.5 s of every ``mm train`` that never uses Ray."""
    from flows.ray_runner import ResourceRayTaskRunner

    r = config.ray
    return ResourceRayTaskRunner(r.address, init_kwargs(r), num_cpus=r.num_cpus_per_task,
                                 num_gpus=r.num_gpus_per_task)


def sweep_task_runner(config: ExperimentConfig) -> tuple[ExperimentConfig, TaskRunner]:
    """The sweep's task runner and the config its tasks receive (paths made absolute for Ray workers)."""
    if config.sweep.runner == "ray":
        return absolute_paths(config), ray_task_runner(config)
    return config, ProcessPoolTaskRunner(max_workers=config.sweep.max_parallel)


def task_threads(config: ExperimentConfig) -> int:
    """torch threads per training task: the CPUs Ray reserves for it, or this machine's cores shared by the
    process pool's workers."""
    if config.sweep.runner == "ray":
        return max(1, math.ceil(config.ray.num_cpus_per_task))
    return threads_per_worker(config.sweep.max_parallel)
