"""The sweep's Ray task runner (``sweep.runner: ray``), apart from ``flows.runners`` so that prefect-ray, and the
lazy ``ray`` module it registers, are imported only by a sweep that runs on Ray."""
from __future__ import annotations

from typing import Any

from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext, remote_options


class ResourceRayTaskRunner(RayTaskRunner):
    """prefect-ray's runner, reserving ``num_cpus`` and ``num_gpus`` on the cluster for every task it submits
    (``num_gpus=None``: 1 when the cluster has GPUs, else 0). An enclosing ``remote_options(...)`` wins."""

    def __init__(self, address: str | None = None, init_kwargs: dict[str, Any] | None = None,
                 num_cpus: float = 1.0, num_gpus: float | None = None):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def duplicate(self) -> ResourceRayTaskRunner:
        return type(self)(self.address, self.init_kwargs, self.num_cpus, self.num_gpus)

    def __eq__(self, other: object) -> bool:
        return (super().__eq__(other) and isinstance(other, ResourceRayTaskRunner)
                and (self.num_cpus, self.num_gpus) == (other.num_cpus, other.num_gpus))

    def task_resources(self) -> dict[str, float]:
        import ray

        gpus = self.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        return {"num_cpus": self.num_cpus, "num_gpus": gpus}

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        options = {**self.task_resources(), **RemoteOptionsContext.get().current_remote_options}
        with remote_options(**options):
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
