"""Deployments with cron schedules, served against the configured Prefect API (local server by default)."""
from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from models.config import ExperimentConfig

from .pipeline import extract_flow, pipeline_flow


def deployments(config: ExperimentConfig, name_prefix: str | None = None) -> list:
    """The scheduled jobs declared in the config's ``schedule`` section, as Prefect deployments."""
    prefix = name_prefix or config.data.dataset_name
    params = {"config": config.model_dump(mode="json")}
    tz = config.schedule.timezone
    return [
        pipeline_flow.to_deployment(f"{prefix}-nightly-pipeline", parameters=params,
                                    schedules=[Cron(config.schedule.pipeline_cron, timezone=tz)]),
        extract_flow.to_deployment(f"{prefix}-incremental-extract", parameters=params,
                                   schedules=[Cron(config.schedule.extract_cron, timezone=tz)]),
    ]


def serve_deployments(configs: list[ExperimentConfig]) -> None:
    """Register the deployments and run them on their schedules from this process (Ctrl-C stops)."""
    serve(*[d for c in configs for d in deployments(c)])
