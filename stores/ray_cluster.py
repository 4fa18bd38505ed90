"""The Ray cluster a config names (the ``ray`` section): how to start or join it. Shared by Ray Data extraction
(``stores.extraction.ray``) and the sweep's Ray task runner (``flows.runners``)."""
from __future__ import annotations

from typing import Any

from models.config import RayConfig


def init_kwargs(r: RayConfig) -> dict[str, Any]:
    """``ray.init`` settings for ``r``: a new local cluster's size (no dashboard) when there is no address (ray.init
    refuses them when it joins a cluster), and the runtime environment."""
    init: dict[str, Any] = {}
    if r.address is None:
        init = {"include_dashboard": False, **({"num_cpus": r.num_cpus} if r.num_cpus is not None else {})}
    if r.runtime_env:
        init["runtime_env"] = r.runtime_env
    return init


def connect(r: RayConfig) -> None:
    """Join the cluster at ``ray.address``, or start a local one; an initialized Ray in this process is reused."""
    import ray

    if not ray.is_initialized():
        ray.init(address=r.address, **init_kwargs(r))
