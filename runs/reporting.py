"""Comparison tables and sweep reports: the papers' table (mean +- sd over seeds per scenario, grid mean) as
Markdown, JSON and HTML, with a robustness-curve plot."""
from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from models.config import TrackingConfig
from models.patterns import MissingPattern, missing_scenario, modalities_of, scenario_slug
from models.records import RunRow
from runs.gap import add_gap_closed, protection_horizon
from stores.tracking.runs import run_results


def _mean_sd(vals: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd; sd is None for a single value (nothing to spread)."""
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def aggregate(results: list[RunRow], metric: str) -> tuple[list[str], list[dict]]:
    """The one table builder (sweep report, ``mm compare``, bench/README): rows per (variant, train pattern),
    scenario -> (mean, sd or None, ...) over seeds, plus the grid mean. ``results`` are the training task's
    rows (or ``run_results``' rows read back from MLflow)."""
    gaps = add_gap_closed(results, metric, modalities_of(sorted({s for r in results for s in r.scenarios})))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r.variant, r.train_pattern)].append(r)
    scenarios = sorted({s for r in results for s in r.scenarios})
    rows = []
    for (variant, pattern), runs in sorted(groups.items()):
        row = {"head": variant, "train_pattern": pattern, "seeds": len(runs)}
        for s in scenarios:
            vals = [r.scenarios[s][metric] for r in runs if s in r.scenarios and metric in r.scenarios[s]]
            if vals:
                row[s] = _mean_sd(vals)
        grid = [r.summary[f"grid_mean_{metric}"] for r in runs if f"grid_mean_{metric}" in r.summary]
        if grid:
            row["grid_mean"] = _mean_sd(grid)
        for g in gaps:
            if vals := [r.summary[g] for r in runs if g in r.summary]:
                row[g] = _mean_sd(vals)
        rows.append(row)
    return scenarios, rows


def head_label(variant: str) -> str:
    """A run's head as run names and plots show it (``oracle-image``, ``moddrop-lora``, ``cmpt``): the variant's
    paths stay in the full report and the run's ``head_variant`` tag."""
    name, _, rest = variant.partition("[")
    parts = dict(p.split(":", 1) for p in rest.rstrip("]").split(",") if ":" in p)
    name += f"-{parts['only']}" if "only" in parts else ""
    return name + ("-lora" if parts.get("backbone") == "encoder+lora" else "")


def summary_table(results: list[RunRow], metric: str) -> str:
    """The few comparison numbers per head as Markdown (a sweep's MLflow description): complete data, grid
    mean, each modality 100% missing and the gap closed there, mean ± sd over seeds in %."""
    scenarios, rows = aggregate(results, metric)
    modalities = modalities_of(scenarios)
    gone = {m: missing_scenario(m, modalities) for m in modalities}
    cols = ["complete", "grid mean", *(f"no {m}" for m in modalities), *(f"gap closed, no {m}" for m in modalities)]
    lines = ["| head | train pattern | " + " | ".join(cols) + " | seeds |", "|" + "---|" * (len(cols) + 3)]
    complete = scenario_slug(MissingPattern(), modalities)
    for r in rows:
        values = [r.get(complete, ""), r.get("grid_mean", "")] + [r.get(gone[m], "") for m in modalities]
        values += [_ratio(r.get(f"gap_closed_{m}")) for m in modalities]
        lines.append(f"| {head_label(r['head'])} | {md(r['train_pattern'])} | " + " | ".join(cell(v) for v in values)
                     + f" | {r['seeds']} |")
    return "\n".join(lines)


def _ratio(v) -> str:
    """A gap closed (a fraction of the gap, not a score): ``0.85``, ``± sd`` with several seeds."""
    if not isinstance(v, tuple):
        return ""
    mean, sd = v
    return f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def columns(scenarios: list[str], rows: list[dict] = ()) -> list[str]:
    """Table columns: scenarios, grid mean, any ``gap_closed_<m>`` the rows carry, seeds."""
    gaps = sorted({k for r in rows for k in r if k.startswith("gap_closed_")})
    return ["head", "train_pattern", *scenarios, "grid_mean", *gaps, "seeds"]


def cell(v) -> str:
    """A (mean, sd) pair in percent, "± sd" only when there is more than one seed."""
    if not isinstance(v, tuple):
        return str(v)
    mean, sd = v
    return f"{mean * 100:.1f}" + (f" ± {sd * 100:.1f}" if sd is not None else "")


def md(text: str) -> str:
    """Text for a Markdown table cell: a pattern's own "|" (``by_class[text|...]``) would split the cell."""
    return text.replace("|", "\\|")


def markdown_table(scenarios: list[str], rows: list[dict]) -> str:
    cols = columns(scenarios, rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(md(cell(r.get(c, ""))) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def json_rows(scenarios: list[str], rows: list[dict]) -> list[dict]:
    """The same table for ``--json``: {column: value}, a pair as {"mean", "sd", "n"} (fractions, not %)."""
    out = []
    for r in rows:
        out.append({c: ({"mean": r[c][0], "sd": r[c][1], "n": r["seeds"]} if isinstance(r.get(c), tuple)
                        else r.get(c)) for c in columns(scenarios, rows)})
    return out


def write_report(results: list[RunRow], out_dir: Path, title: str, metric: str = "acc") -> Path:
    from matplotlib.figure import Figure  # the object API: no process-wide backend (see Tracker._artifacts)

    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios, rows = aggregate(results, metric)
    table = markdown_table(scenarios, rows)
    modalities = sorted({part.split("-")[0] for s in scenarios for part in s.split("/") if "-" in part
                         and part.split("-")[1].isdigit()})
    fig = Figure(figsize=(5 * max(1, len(modalities)), 4.6))
    axes = fig.subplots(1, max(1, len(modalities)), squeeze=False)
    for ax, m in zip(axes[0], modalities):
        for r in rows:
            pts = []
            for s in scenarios:
                parts = dict(p.rsplit("-", 1) for p in s.split("/") if "-" in p)
                if s in r and m in parts and parts[m].isdigit() and all(v == "000" for k, v in parts.items()
                                                                        if k != m):
                    pts.append((int(parts[m]), r[s][0]))
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=head_label(r["head"]) + (
                    "" if r["train_pattern"] == "complete" else f" @ {r['train_pattern']}"))
        ax.set(title=f"{m} missing at test", xlabel="missing rate (%)", ylabel=metric)
    handles, labels = axes[0][0].get_legend_handles_labels()  # one legend for all panels, under them
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 5), 1, 1))
    fig.savefig(out_dir / "robustness.png", dpi=110)
    md = f"# {title}\n\nTest {metric} (%, mean ± sd when there is more than one seed). Scenario columns give " \
         f"each modality's missing rate at test.\n\n{table}\n\n{horizon_table(results, metric)}" \
         f"![robustness](robustness.png)\n"
    (out_dir / "report.md").write_text(md)
    body = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in line.strip('|').split('|'))}</tr>"
                   for line in table.splitlines() if not line.startswith("|---"))
    (out_dir / "report.html").write_text(f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                                         f"<style>td{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>"
                                         f"<h1>{html.escape(title)}</h1><table>{body}</table>"
                                         f"<img src='robustness.png'></body></html>")
    return out_dir / "report.md"


def horizon_table(results: list[RunRow], metric: str) -> str:
    """The protection horizon (``runs.gap.protection_horizon``) as a Markdown section, or nothing when the sweep
    lacks the references (the oracles, modality dropout)."""
    horizon = protection_horizon(results, metric)
    if not any(v is not None for h in horizon.values() for v in h.values()):
        return ""
    keys = list(next(iter(horizon.values())))  # per modality: below the oracle, below modality dropout
    lines = ["## Protection horizon", "", "The lowest test missing rate at which a head (trained on complete data, "
             "or under the pattern after its @) falls below the unimodal oracle of the remaining modality, and below "
             "modality dropout (each trained under the same pattern where the sweep has one, else complete); "
             "\"-\": not within the grid.", "", "| head | " + " | ".join(k.replace("_", ", no ") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    lines += [f"| {md(h)} | " + " | ".join("-" if v[k] is None else f"{v[k]:.0%}" for k in keys) + " |"
              for h, v in horizon.items()]
    return "\n".join(lines) + "\n\n"


def compare_table(tracking: TrackingConfig, experiment: str, metric: str = "acc") -> pd.DataFrame:
    """Paper-style table of the experiment's runs: one row per (head, train pattern), one column per scenario
    and the grid mean, mean ± sd over seeds (the same builder as the sweep report)."""
    scenarios, rows = aggregate(run_results(tracking, experiment, metric), metric)
    return pd.DataFrame([{c: r[c] if c == "seeds" else cell(r.get(c, "")) for c in columns(scenarios, rows)}
                         for r in rows])


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no runs)"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
