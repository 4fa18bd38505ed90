"""Report tasks: the sweep's comparison table and robustness plot on disk, and the sweep's MLflow parent run
that shows them in the UI (its trainings nest under it)."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from models.config import ExperimentConfig
from models.records import RunRow
from runs.gap import gap_metrics
from runs.reporting import summary_table, write_report
from stores.tracking.studies import end_sweep_run, start_sweep_run

from .common import retry_transient

def report_title(dataset: str) -> str:
    return f"{dataset}: robustness to missing modalities"


@task(name="write-report")
def report(results: list[RunRow], dataset: str, metric: str, out_root: str = "reports") -> str:
    out = Path(out_root) / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return str(write_report(results, out, report_title(dataset), metric))


@task(name="start-sweep-run", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def start_sweep(cfg: ExperimentConfig, tags: dict[str, str] | None = None) -> str:
    """The sweep's parent run, named ``sweep-<time>``; returns its run id."""
    return start_sweep_run(cfg, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags)


@task(name="finish-sweep-run", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def finish_sweep(cfg: ExperimentConfig, run_id: str, results: list[RunRow], report_path: str | None, metric: str,
                 failed: bool = False) -> None:
    """The report as the parent run's artifacts and description, ``compare/gap_closed_<m>`` on each child; FAILED
    (with nothing else) when the sweep did not finish."""
    if failed or report_path is None:
        end_sweep_run(cfg.tracking, run_id, None, "The sweep failed: see its FAILED child runs and the flow's log.",
                      {}, failed=True)
        return
    text = (f"# {report_title(cfg.data.dataset_name)}\n\nTest {metric} (%, mean ± sd over seeds), {len(results)} runs "
            "nested below. Every scenario: `report.md` / `report.html`; every head on one plot: `robustness.png` "
            f"(Artifacts).\n\n{summary_table(results, metric)}\n")
    end_sweep_run(cfg.tracking, run_id, Path(report_path).parent, text, gap_metrics(results, metric))
