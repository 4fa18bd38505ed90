"""Sweep reports: the papers' comparison table (mean +- sd over seeds per scenario) as Markdown and HTML,
with a robustness-curve plot."""
from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import numpy as np

from .gap import add_gap_closed, modalities_of


def aggregate(results: list[dict], metric: str) -> tuple[list[str], list[dict]]:
    """Rows per (variant, train pattern): scenario -> (mean, sd, n) over seeds, plus ``gap_closed_<m>`` when the
    runs include zero-fill early fusion and the unimodal oracles."""
    gaps = add_gap_closed(results, metric, modalities_of(sorted({s for r in results for s in r["scenarios"]})))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["variant"], r["train_pattern"])].append(r)
    scenarios = sorted({s for r in results for s in r["scenarios"]})
    rows = []
    for (variant, pattern), runs in sorted(groups.items()):
        row = {"head": variant, "train_pattern": pattern, "seeds": len(runs)}
        for s in scenarios:
            vals = [r["scenarios"][s][metric] for r in runs if s in r["scenarios"] and metric in r["scenarios"][s]]
            row[s] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        grid = [r["summary"][f"grid_mean_{metric}"] for r in runs if f"grid_mean_{metric}" in r["summary"]]
        row["grid_mean"] = (float(np.mean(grid)), float(np.std(grid, ddof=1)) if len(grid) > 1 else 0.0)
        for g in gaps:
            vals = [r["summary"][g] for r in runs if g in r["summary"]]
            if vals:
                row[g] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        rows.append(row)
    return scenarios, rows


def markdown_table(scenarios: list[str], rows: list[dict]) -> str:
    gaps = sorted({k for r in rows for k in r if k.startswith("gap_closed_")})
    cols = ["head", "train_pattern", *scenarios, "grid_mean", *gaps, "seeds"]
    fmt = lambda v: f"{v[0] * 100:.1f} ± {v[1] * 100:.1f}" if isinstance(v, tuple) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(results: list[dict], out_dir: Path, title: str, metric: str = "acc") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios, rows = aggregate(results, metric)
    table = markdown_table(scenarios, rows)
    modalities = sorted({part.split("-")[0] for s in scenarios for part in s.split("/") if "-" in part
                         and part.split("-")[1].isdigit()})
    fig, axes = plt.subplots(1, max(1, len(modalities)), figsize=(5 * max(1, len(modalities)), 3.8), squeeze=False)
    for ax, m in zip(axes[0], modalities):
        for r in rows:
            pts = []
            for s in scenarios:
                parts = dict(p.rsplit("-", 1) for p in s.split("/") if "-" in p)
                if m in parts and parts[m].isdigit() and all(v == "000" for k, v in parts.items() if k != m):
                    pts.append((int(parts[m]), r[s][0]))
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{r['head']} ({r['train_pattern']})")
        ax.set(title=f"{m} missing at test", xlabel="missing rate (%)", ylabel=metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "robustness.png", dpi=110)
    plt.close(fig)
    md = f"# {title}\n\nTest {metric} (mean ± sd over seeds, %). Scenario columns give each modality's " \
         f"missing rate at test.\n\n{table}\n\n![robustness](robustness.png)\n"
    (out_dir / "report.md").write_text(md)
    body = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in line.strip('|').split('|'))}</tr>"
                   for line in table.splitlines() if not line.startswith("|---"))
    (out_dir / "report.html").write_text(f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                                         f"<style>td{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>"
                                         f"<h1>{html.escape(title)}</h1><table>{body}</table>"
                                         f"<img src='robustness.png'></body></html>")
    return out_dir / "report.md"
