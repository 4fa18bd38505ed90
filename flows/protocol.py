"""The ``protocol`` flow: one of the papers' protocols as a named, versioned preset (``models.protocol_presets``)
run through the sweep (``flows.pipeline.run_sweep``: cached, parallel, nested in MLflow), then its tables."""
from __future__ import annotations

from prefect import flow

from flows.pipeline import run_sweep
from models.config import ExperimentConfig
from tasks.protocols import protocol_plan, protocol_report


@flow(name="protocol")
def protocol_flow(config: ExperimentConfig, preset: str, heads: list[str] | None = None,
                  seeds: list[int] | None = None, epochs: int | None = None, paper_rows: bool = True) -> dict:
    """Train the preset's runs (heads x training patterns x seeds) as one sweep; return its tables (published
    rows beside them on the paper's dataset), the sweep's report and run, and the runs."""
    plan = protocol_plan(config, preset, heads, seeds, epochs, paper_rows)
    swept = run_sweep(config, {"protocol": preset}, [c for _, c in plan])
    result = protocol_report(config, preset, [k for k, _ in plan], swept.results)
    return {**result, "report": swept.report, "sweep_run_id": swept.run_id,
            "runs": [r.brief() for r in swept.results]}
