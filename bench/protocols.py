"""The papers' protocol tables on the real stores (issue 9): every head plus the unimodal oracles, S seeds,
test accuracy mean ± sd (%).

  a  001 Table 1: missing-aware-prompts protocol, the same missing type (each modality, both) at train and test,
     eta = 70%
  b  001 Table 6: 3 x 3 grid of train type x test type at eta = 70%
  c  004 Table VI: trained complete, the modality 004 removes (text; audio for audio+image: ``c_modality``)
     available at 100/90/70/50/30/10/0% at test; ``--c-remove other`` (or ``both``) adds the other direction as
     a labelled extra table
  d  000 Table III: one model trained complete (heads apply their own masking), tested at (first %, second %)
     available = (100,100), (100,30), (100,0), (65,65), (30,100), (0,100)

The protocol logic lives in runs/protocols.py (shared with ``mm protocol <preset>``); this script keeps its own
run log. a and b share their training runs (trained under each MAP type), c and d share theirs (trained complete):
each (head, train pattern, seed) is trained once by runs.train.train_and_evaluate with every test pattern it
needs as eval.extra_patterns. Finished runs are kept in bench/results/protocols-<dataset>.jsonl and read back.

Checkpoints are selected as the papers do (``--selection paper``, the default): on the validation split under
the training pattern (001 A4, MAP's protocol: validation at the training missing rate); ``--selection robust``
(averaged with each modality absent) is a variant, named ``select=robust`` in every run's deviation label.
Each head a paper states values for gets a "paper constants" row beside its default (or tuned) one
(``models.paper.paper_head``; ``--no-paper-rows`` leaves them out); every value that differs from the paper's,
the training recipe included, is named in the run's label (``models.paper.deviations``).

    python bench/protocols.py --datasets fashion_colour --heads early moddrop srmm oracle --seeds 0 \
        --protocols c d --epochs 15
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from runs.protocols import (C_REMOVE, HEADS, PROTOCOLS, SELECTION, c_modalities, head_specs, key_head,
                            protocol_table, run_config, run_key, spec_label, training_plan, tuned_applies,
                            verdict_table, with_paper_rows)
# re-exported: tests/test_tuning.py checks these helpers through this script
from runs.protocols import c_modality, c_title, map_pattern, protocol_patterns  # noqa: F401
from models.config import ExperimentConfig
from models.patterns import scenario_slug
from runs.train import train_and_evaluate
from stores.config_files import load_config
from stores.features.feature_store import open_store
from stores.tracking.studies import log_tables_run


# ---------------------------------------------------------------------- runs (logged to bench/results/*.jsonl)
def measure(ds: str, args, base: ExperimentConfig, heads: list[dict], mods: list[str], plan: dict,
            log: Path) -> list[dict]:
    done = {r["key"]: r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    results = []
    for head in heads:
        for train, tests in plan.values():
            for seed in args.seeds:
                key = run_key(key_head(head, mods), train, seed, args.epochs, tuned_applies(base, head, args.tuned),
                              args.selection)
                need = {scenario_slug(t, mods) for t in tests}
                if key in done and need <= set(done[key]["scenarios"]):
                    results.append(done[key])
                    continue
                if args.report_only:
                    continue
                cfg = run_config(base, head, train, tests, seed, args.tuned, args.epochs, args.selection)
                t0 = time.perf_counter()
                r = train_and_evaluate(cfg)
                row = {**r.row().as_dict(), "key": key, "epochs": cfg.train.epochs, "best_epoch": r.fit.best_epoch,
                       "seconds": time.perf_counter() - t0}
                results.append(row)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{ds} {r.variant} train={train.key} seed {seed}: val {r.summary['val_acc']:.3f} "
                      f"({row['seconds']:.0f}s)", flush=True)
    return results



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["avmnist", "fashion", "fashion_colour"])
    ap.add_argument("--heads", nargs="+", default=HEADS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--protocols", nargs="+", default=PROTOCOLS, choices=PROTOCOLS)
    ap.add_argument("--epochs", type=int, default=None, help="max epochs (default: the config's, or the tuned one)")
    ap.add_argument("--tuned", action="store_true", help="apply configs/tuned/<dataset>-<head>.yaml where it exists")
    ap.add_argument("--selection", choices=list(SELECTION), default="paper",
                    help="checkpoint selection: paper (validation under the training pattern, 001 A4) or robust "
                         "(also each modality absent; a variant named select=robust in the run labels)")
    ap.add_argument("--c-remove", choices=C_REMOVE, default="paper",
                    help="protocol c removes the paper's modality (text; audio for audio+image), the other one "
                         "(a labelled extra), or both")
    ap.add_argument("--no-paper-rows", action="store_true", help="leave out the paper-constants rows")
    ap.add_argument("--set", action="append", default=[], help="config override for every run")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--report-only", action="store_true", help="tables from the finished runs only; train nothing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds in args.datasets:
        base = load_config(f"configs/{ds}.yaml", args.set)
        store = open_store(base)
        mods = store.modalities
        heads = head_specs(args.heads, mods, list(store.meta.emb_dim))  # emb tokens: encoder blocks
        if not args.no_paper_rows:
            heads = with_paper_rows(base, heads, args.tuned)
        removed = c_modalities(mods, args.c_remove)
        t0 = time.perf_counter()
        results = measure(ds, args, base, heads, mods, training_plan(args.protocols, mods, removed),
                          out / f"protocols-{ds}.jsonl")
        sections, metrics = [], {}
        if {"c", "d"} & set(args.protocols):
            text, flat = verdict_table(results)
            metrics.update({re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in flat.items()})
            sections.append(f"### Verdict (issue 9): trained complete, seeds {args.seeds}\n\n{text}\n")
        for p, c_removed in [(p, m) for p in args.protocols for m in (removed if p == "c" else [None])]:
            title, text, flat = protocol_table(p, [dict(r) for r in results], mods, c_removed)
            sections.append(f"### {title}\n\n{text}\n")
            tag = title.split(")")[0]  # c-other for the extra direction
            metrics.update({re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"{tag}/{k}"): v for k, v in flat.items()})
        tuned = [spec_label(h) for h in heads if tuned_applies(base, h, args.tuned)]
        md = (f"## {ds}: test accuracy (%), mean ± sd over seeds {args.seeds}; epochs "
              f"{args.epochs or 'from config'}; checkpoints selected on validation "
              + ("under the training pattern (the papers')" if args.selection == "paper" else
                 "averaged with each modality absent (robust: NOT the papers', select=robust in the labels)")
              + (f"; tuned (configs/tuned/): {', '.join(tuned) or 'none'}, the other heads on their defaults"
                 if args.tuned else "")
              + ("" if args.report_only else f"; 2-core CPU {time.perf_counter() - t0:.0f}s") + "\n\n" + "\n".join(sections))
        suffix = ("-tuned" if args.tuned else "") + ("-robust" if args.selection == "robust" else "")
        path = out / f"protocols-{ds}{suffix}.md"
        path.write_text(md)
        print(md, flush=True)
        log_tables_run(base.tracking, base.data.dataset_name, f"protocols-{ds}", {path.name: md}, metrics,
                       {"seeds": args.seeds, "heads": args.heads, "protocols": args.protocols, "epochs": args.epochs,
                        "tuned": args.tuned, "selection": args.selection, "c_remove": args.c_remove,
                        "paper_rows": not args.no_paper_rows}, {"kind": "protocols"})


if __name__ == "__main__":
    main()
