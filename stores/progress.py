"""Per-run progress files: how a training task in a worker process (Prefect's process pool) tells the console
in the parent process how far it is. Off unless ``MM_PROGRESS_DIR`` names a folder (the CLI sets it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "MM_PROGRESS_DIR"


def report(run: str, **fields) -> None:
    """Replace ``<dir>/<run>.json`` with ``fields`` (atomic rename: a reader never sees half a file)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    path = Path(folder) / f"{run.replace('/', '_')}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"run": run, **fields}, default=float))
    os.replace(tmp, path)


def read_all(folder: str | Path) -> dict[str, dict]:
    """Every run's latest progress, by run name."""
    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        out[d["run"]] = d
    return out
