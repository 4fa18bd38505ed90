"""Protocol preset tasks (``mm protocol``): a preset's runs as configs for the sweep, and its tables with the
papers' published rows (logic in runs/protocols.py)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.config import ExperimentConfig
from models.metrics import primary_metric
from models.records import RunRow
from runs.protocols import get_preset, preset_report, preset_runs, result_rows
from stores.features.feature_store import open_store


@task(name="protocol-plan", cache_policy=NO_CACHE)
def protocol_plan(cfg: ExperimentConfig, preset: str, heads: list[str] | None = None, seeds: list[int] | None = None,
                  epochs: int | None = None, paper_rows: bool = True) -> list[tuple[str, ExperimentConfig]]:
    """(run key, config) of each of the preset's runs on this config's store (``runs.protocols.preset_runs``)."""
    store = open_store(cfg)
    return preset_runs(get_preset(preset), cfg, store.modalities, list(store.meta.emb_dim), heads, seeds, epochs,
                       paper_rows)


@task(name="protocol-report", cache_policy=NO_CACHE)
def protocol_report(cfg: ExperimentConfig, preset: str, keys: list[str], rows: list[RunRow]) -> dict:
    """The preset's tables from the sweep's rows, the published rows beside them on the paper's dataset."""
    store = open_store(cfg)
    return preset_report(get_preset(preset), result_rows(keys, rows), store.modalities, cfg.data.dataset,
                         primary_metric(store.meta.task))
