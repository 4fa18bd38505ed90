"""Reproduce a logged run: its config and the store versions it read, read back from tracking, trained again and
its metrics compared. Apart from ``train`` so that training alone does not import MLflow."""
from __future__ import annotations

from models.config import ExperimentConfig
from models.records import Reproduction
from runs.train import train_and_evaluate
from stores.config_files import parse_override, set_path, validate
from stores.tracking.lineage import logged_run


def reproduce(cfg: ExperimentConfig, run_id: str, overrides: list[str] | None = None) -> Reproduction:
    """Re-run logged run ``run_id`` (found in ``cfg.tracking``) from its config on the store versions it read;
    ``overrides`` (e.g. ``store.root`` when the store moved) apply on top, the versions always come from the run.
    Nothing is logged: the new metrics are compared with the logged ones."""
    logged = logged_run(cfg.tracking, run_id)
    tree = logged.config
    for item in overrides or []:
        set_path(tree, *parse_override(item))
    tree.setdefault("store", {})["versions"] = logged.versions
    new = train_and_evaluate(validate(tree, f" of run {run_id}")).scalar_metrics()
    rows = [{"metric": k, "original": v, "reproduced": new.get(k), "equal": new.get(k) == v}
            for k, v in sorted(logged.metrics.items()) if k in new and k != "fit/seconds"]
    return Reproduction(run_id, logged.versions, all(r["equal"] for r in rows), rows)
