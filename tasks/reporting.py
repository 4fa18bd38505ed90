"""Report task: the sweep's comparison table and robustness plot on disk."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from models.records import RunRow
from runs.reporting import write_report


@task(name="write-report")
def report(results: list[RunRow], dataset: str, metric: str, out_root: str = "reports") -> str:
    out = Path(out_root) / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return str(write_report(results, out, f"{dataset}: robustness to missing modalities", metric))
