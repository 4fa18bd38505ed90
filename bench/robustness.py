"""Robustness table (issue 3): every head, test missing rates 0/30/50/70/90/100% per modality, N seeds,
on the real extracted stores with the real encoders. Prints a Markdown table of test accuracy (mean +- sd).

    python bench/robustness.py --dataset avmnist --dataset fashion --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stores.config_files import load_config
from models.heads import parse_head_config
from models.records import RunRow
from runs.reporting import aggregate, markdown_table
from runs.train import train_and_evaluate

HEADS = ["early", "late", "moddrop", "srmm", "mmp", "cmpt"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", action="append", default=None)
    ap.add_argument("--heads", nargs="+", default=HEADS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds in args.dataset or ["avmnist", "fashion"]:
        log = out / f"robustness-{ds}.jsonl"
        # resumable: rows already measured (same head, seed) are read back, not re-run
        done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        have = {(r["variant"].split("[")[0], r["seed"]): r for r in done}
        results = []
        for head in args.heads:
            for seed in args.seeds:
                if (head, seed) in have:
                    results.append(have[(head, seed)])
                    continue
                cfg = load_config(f"configs/{ds}.yaml", [f"train.epochs={args.epochs}", f"seed={seed}", *args.set])
                cfg = cfg.model_copy(update={"head": parse_head_config({"name": head})})
                t0 = time.perf_counter()
                r = train_and_evaluate(cfg)
                row = {**r.row().as_dict(), "seconds": time.perf_counter() - t0}
                results.append(row)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{ds} {r.variant} seed {seed}: grid mean {r.summary['grid_mean_acc']:.3f} "
                      f"({row['seconds']:.0f}s)", flush=True)
        scenarios, rows = aggregate([RunRow.from_dict(r) for r in results], "acc")
        table = markdown_table(scenarios, rows)
        secs = {r["variant"]: 0.0 for r in results}
        for r in results:
            secs[r["variant"]] += r["seconds"] / len(args.seeds)
        text = (f"## {ds}: test accuracy (%), mean ± sd over seeds {args.seeds}, {args.epochs} epochs max\n\n"
                f"Columns: missing rate of each modality at test.\n\n{table}\n\n"
                f"Seconds per run (train + grid eval, CPU): "
                + ", ".join(f"{k}: {v:.0f}" for k, v in secs.items()) + "\n")
        (out / f"robustness-{ds}.md").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
