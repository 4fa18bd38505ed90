"""The CLI's console: third-party noise silenced at its source (one place), a live per-run training display fed
by the workers' progress files, and rich tables (or JSON with ``--json``) for results."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich import box

# Environment read by libraries at import (and inherited by Prefect's worker processes). setdefault: a value
# the user exported wins.
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one "Downloading artifacts" bar per model load/log
    "MLFLOW_DISABLE_TELEMETRY": "true",  # the "Failed to send telemetry" errors offline
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the Prefect server's telemetry errors offline
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of Hugging Face tokenizers
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar (one per encoder load)
    "TRANSFORMERS_VERBOSITY": "error",
    "LANCEDB_LOG": "error",  # Lance's Rust WARN lines (IVF partitions with few rows, "dataset will be created")
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}
DEBUG = "MM_DEBUG"


def quiet(debug: bool | None = None) -> None:
    """Silence third-party noise. Call before importing Prefect or MLflow. With ``debug`` (``MM_DEBUG=1`` in
    worker processes) Prefect logs at INFO, failed tasks with their tracebacks."""
    if debug is None:
        debug = os.environ.get(DEBUG) == "1"
    os.environ[DEBUG] = "1" if debug else "0"
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    # a failed task or flow makes Prefect log its traceback at ERROR before the CLI prints the one-line reason;
    # unexpected errors still reach the CLI, which shows their traceback
    os.environ["PREFECT_LOGGING_LEVEL"] = "INFO" if debug else "CRITICAL"
    for name in ("mlflow", "alembic", "httpx", "urllib3", "lance", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # warnings filtered by message and module; each is harmless and repeats once per image, model or run
    warnings.filterwarnings("ignore", message="Palette images with Transparency", module="PIL")  # fashion PNGs
    warnings.filterwarnings("ignore", message=".*Hint: Inferred schema contains integer", module="mlflow")
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated")  # imported by a dependency
    # mlflow's input-example check compares columns with a range (pandas 3 deprecation, inside mlflow)
    warnings.filterwarnings("ignore", message="Operation with range is deprecated", module="mlflow")


def console(stderr: bool = False):
    """Rich console; printed to a file or pipe (a log), 100 columns instead of rich's 80 so a comparison of eight
    heads fits on one line per scenario (a terminal keeps its own width; COLUMNS overrides both). Markup is off:
    everything printed is data (head variants such as ``cmpt[text:encoder+lora]``, titles, paths, errors), and
    rich would take a bracketed part for a style tag and drop it."""
    from rich.console import Console
    c = Console(stderr=stderr, highlight=False, markup=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, highlight=False, markup=False, width=100)
    return c


# ---------------------------------------------------------------------------------------------- progress
@contextmanager
def training_progress(enabled: bool = True, poll_s: float = 0.5) -> Iterator[None]:
    """While the block runs, show one bar per training run (epochs, validation metric, state), read from the
    progress files the training tasks write (``stores.progress``) in their worker processes. The display starts
    with the first run, so the extraction stage before it keeps its own bar."""
    from stores import progress

    if not enabled:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    folder = tempfile.mkdtemp(prefix="mm-progress-")
    old = os.environ.get(progress.ENV)
    os.environ[progress.ENV] = folder
    bars = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("epochs  {task.fields[val]:<10} {task.fields[state]:<9} {task.fields[elapsed]}"),
                    console=console(stderr=True), transient=False)
    tasks: dict[str, Any] = {}
    stop = threading.Event()

    def update() -> None:
        for run, d in progress.read_all(folder).items():
            if run not in tasks:
                if not bars.live.is_started:
                    bars.start()
                tasks[run] = bars.add_task(run, total=d.get("epochs") or 1, val="", state="", elapsed="")
            val = f"val {d['val']:.3f}" if isinstance(d.get("val"), (int, float)) else ""
            secs = d.get("seconds") or (time.time() - d["started"] if "started" in d else 0)
            bars.update(tasks[run], completed=d.get("epoch", 0), total=d.get("epochs") or 1, val=val,
                        state=d.get("state", ""), elapsed=f"{secs:.0f} s")

    def poll() -> None:
        while not stop.wait(poll_s):
            update()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        update()
        if bars.live.is_started:
            bars.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if old is None:
            os.environ.pop(progress.ENV, None)
        else:
            os.environ[progress.ENV] = old


# ---------------------------------------------------------------------------------------------- output
def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded for reading (``--json`` keeps full precision)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def key_values(obj: dict, title: str | None = None) -> None:
    """A two-column table of a result dict; nested values as compact JSON."""
    from rich.table import Table
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in rounded(obj).items():
        t.add_row(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
    console().print(t)


def records(rows: list[dict], title: str | None = None) -> None:
    """A table with one row per dict (columns: the union of keys, in order)."""
    from rich.table import Table
    cols = list(dict.fromkeys(k for r in rows for k in r))
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c in cols:
        t.add_column(str(c), overflow="fold")
    for r in rounded(rows):
        t.add_row(*[v if isinstance(v, str) else "" if v is None else json.dumps(v, default=str)
                    for v in (r.get(c) for c in cols)])
    console().print(t)


def scenario_label(slug: str) -> str:
    """``image-030/text-000`` -> ``image 30%`` (the modalities missing, one line), ``complete`` when none is;
    other scenario slugs as they are."""
    parts = [re.fullmatch(r"(\w+)-(\d{3}(?:\.\d+)?)", p) for p in slug.split("/")]
    if not all(parts):
        return slug
    missing = [f"{m[1]} {float(m[2]):g}%" for m in parts if float(m[2]) > 0]
    return ", ".join(missing) or "complete"


def store_overview(info: dict) -> None:
    """``mm store info``: one row per Lance table, then this config's versions and counts."""
    from rich.table import Table
    t = Table(title=f"feature store {info.get('root', '')}", box=box.SIMPLE_HEAD)
    for c in ("table", "kind", "version", "versions kept", "rows", "MB", "used by"):
        t.add_column(c, justify="right" if c in ("version", "versions kept", "rows", "MB") else "left")
    for name, d in info.get("tables", {}).items():
        t.add_row(name, d.get("kind", ""), str(d.get("version", "")), str(d.get("versions_kept", "")),
                  str(d.get("rows", "")), f"{d.get('bytes', 0) / 1e6:.1f}", ", ".join(d.get("used_by", [])))
    console().print(t)
    cfg = info.get("config")
    if isinstance(cfg, dict):
        key_values({k: cfg[k] for k in ("name", "versions", "rows", "splits", "present", "missing_counts")
                    if k in cfg}, title="this config")
    elif cfg:
        note(str(cfg))


def extraction_line(r: dict) -> None:
    """The extraction stage in one line (``--json`` or ``mm extract`` give every field)."""
    encoded = ", ".join(f"{m} {n}" for m, n in r.get("encoded", {}).items())
    missing = sum(sum(v.values()) for v in r.get("missing_counts", {}).values())
    note(f"extraction: {r.get('rows')} rows in {r.get('store')} ({r.get('added', 0)} added, {r.get('updated', 0)} "
         f"updated, {r.get('removed', 0)} removed; encoded {encoded or 'nothing'}; {missing} inputs missing) in "
         f"{r.get('seconds', 0):.0f} s" + (f"; DVC {r['dvc_hash'][:12]}" if r.get("dvc_hash") else ""))


def neighbours(rows: list[dict], title: str) -> None:
    """``mm query`` hits on one line each: the text, or the file name, of the neighbour's source."""
    def source(s: dict) -> str:
        text = s.get("text") or next((str(v).rsplit("/", 1)[-1] for v in s.values() if v), "")
        return text if len(text) <= 48 else text[:47] + "…"
    records([{**{k: r[k] for k in ("id", "split", "label", "distance")}, "source": source(r.get("source") or {})}
             for r in rows], title=title)


def short_head(variant: str) -> str:
    """A column-sized head name (``runs.reporting.head_label`` on two lines for an oracle: ``oracle`` over its
    modality)."""
    from runs.reporting import head_label
    label = head_label(variant)
    return label.replace("oracle-", "oracle\n", 1) if label.startswith("oracle-") else label


def comparison(scenarios: list[str], rows: list[dict], title: str) -> None:
    """The comparison table (``runs.reporting``: the same cells as the report and ``mm compare``), turned so
    that heads are columns and test scenarios rows: it fits a terminal."""
    from rich.table import Table

    from runs.reporting import cell
    if not rows:
        console().print("(no runs)")
        return
    t = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    t.add_column("missing", no_wrap=True)
    for r in rows:
        t.add_column(short_head(r["head"]) + ("" if r["train_pattern"] == "complete" else f" @ {r['train_pattern']}"),
                     justify="right", overflow="fold", min_width=6)
    for s in scenarios:
        t.add_row(scenario_label(s), *[cell(r.get(s, "")) for r in rows])
    t.add_section()
    t.add_row("grid mean", *[cell(r.get("grid_mean", "")) for r in rows], style="bold")
    for g in sorted({k for r in rows for k in r if k.startswith("gap_closed_")}):
        t.add_row(f"gap {g.removeprefix('gap_closed_')}", *[cell(r.get(g, "")) for r in rows])
    t.add_row("seeds", *[str(r["seeds"]) for r in rows])
    console().print(t)


def note(text: str) -> None:
    console().print(text)


def path_link(p: str | Path) -> str:
    return str(Path(p).resolve())
