"""Scaling (issue 5, benchmark 5), measured in one run: extraction and a sweep on 1x, 4x and 16x synthetic
copies of real Fashion pairs (same photos and titles, new ids), and the sweep with 1 and 2 worker processes.
With ``--ray`` (issue 12): the same sweep on the process pool vs on a local Ray cluster of 1 and 2 CPUs, and
the real extraction with ``store.extract_engine: ray`` (1 and 2 encoder actors) vs the local engine.

    python bench/scaling.py [--base 64] [--copies 1 4 16] [--workers 1 2]
    python bench/scaling.py --copies --ray [--base 64] [--epochs 2] [--extract-rows 256] [--no-sweeps]

Extraction runs the real encoders (EfficientNet-Lite0 + MiniLM) into a fresh LanceDB store per size, no ANN
index; the sweep is the Prefect flow (process pool, MLflow sqlite, model registry) over heads early and srmm
x seeds 0, 1, with Prefect's result cache refreshed so every run trains.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"  # time the training, not the cache
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

from stores.config_files import load_config  # noqa: E402

DATA = Path(os.environ.get("MM_DATASETS_DIR", "../shared/datasets"))


def manifest(base: int, copies: int, out: Path) -> Path:
    """``base`` real Fashion pairs (first rows with a photo and a title), each repeated ``copies`` times."""
    rows = []
    with open(DATA / "fashion" / "styles.csv", newline="", encoding="utf-8", errors="replace") as f:
        for r in csv.DictReader(f):
            img = DATA / "fashion" / "images" / f"{r['id']}.jpg"
            if img.exists() and (r.get("productDisplayName") or "").strip():
                rows.append((r["id"], r["masterCategory"], r["productDisplayName"], str(img.resolve())))
            if len(rows) == base:
                break
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"manifest-{copies}x.jsonl"
    with open(path, "w") as f:
        for k in range(copies):
            for i, (pid, label, title, img) in enumerate(rows):
                split = ["train", "train", "train", "val", "test"][i % 5]
                f.write(json.dumps({"id": f"{pid}-c{k}", "split": split, "label": label, "text": title,
                                    "image": img}) + "\n")
    return path


def config(man: Path, tmp: Path, workers: int = 1, epochs: int = 5):
    return load_config(None, [
        "data.dataset=manifest", f"data.manifest={man}", f"data.allowed_roots=[{DATA}]",  # its photos' folder
        "encoders.image.kind=efficientnet_lite0",
        "encoders.text.kind=minilm", f"store.root={tmp}/store", "store.index_min_rows=1000000000",
        f"tracking.uri=sqlite:///{tmp}/mlruns/mlflow.db", f"tracking.artifact_root={tmp}/mlruns/art",
        f"train.epochs={epochs}", "train.device=cpu", "eval.test_rates=[0.0,0.5,1.0]", "sweep.seeds=[0,1]",
        "sweep.heads=[{name: early},{name: srmm}]", f"sweep.max_parallel={workers}"])


def main() -> None:
    from prefect import flow

    from flows.pipeline import run_sweep
    from stores.extraction import extract

    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=int, default=64)
    ap.add_argument("--copies", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--ray", action="store_true", help="process pool vs Ray sweeps; Ray Data vs local encoding")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--extract-rows", type=int, default=256, help="with --ray: Fashion rows (data.limit) extracted")
    ap.add_argument("--no-sweeps", dest="sweeps", action="store_false", help="with --ray: the extraction only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if not args.copies:  # --ray alone
        return ray_comparison(args, tmp)

    @flow
    def warm_up() -> None:
        """Start Prefect's local server outside the timings."""

    warm_up()
    extract(config(manifest(8, 1, tmp / "warm"), tmp / "warm"), progress=False)  # encoders, page cache, torch init
    ext, sweep = [], []
    for c in args.copies:
        cfg = config(manifest(args.base, c, tmp), tmp / f"{c}x", epochs=args.epochs)
        t0 = time.perf_counter()
        rep = extract(cfg, progress=False)
        ext.append((c, rep.rows, time.perf_counter() - t0, rep.encode_items_per_s))
        print(f"extract {c}x: {rep.rows} rows in {ext[-1][2]:.1f} s", flush=True)
        for w in args.workers:
            cfg_w = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"max_parallel": w})})
            t0 = time.perf_counter()
            out = run_sweep(cfg_w)
            train_s = sum(r.seconds for r in out.results) / len(out.results)
            sweep.append((c, rep.rows, w, len(out.results), time.perf_counter() - t0, train_s))
            print(f"sweep {c}x, {w} workers: {sweep[-1][4]:.1f} s", flush=True)
    base_t = ext[0][2]
    lines = [f"### Scaling: {args.base} real Fashion pairs x copies ({os.cpu_count()} CPU cores)\n",
             "Extraction (real encoders, fresh store, no ANN index; encoders load in each run, so a fixed cost of a "
             "few seconds is in every row):\n",
             "| copies | rows | wall (s) | rows/s | time vs 1x (linear = copies) | encoder items/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c}x | {n} | {t:.1f} | {n / t:.1f} | {t / base_t:.1f}x | "
              + ", ".join(f"{m} {v:.0f}" for m, v in rates.items()) + " |" for c, n, t, rates in ext]
    lines += ["", "Sweep (Prefect process pool; early + srmm x 2 seeds = 4 runs, 5 epochs, grid of 5 scenarios, "
              "each logged and registered in MLflow):\n",
              "| copies | rows | workers | runs | wall (s) | s/run | of which train + grid eval (s/run) | "
              "speed-up vs 1 worker |", "|---|---|---|---|---|---|---|---|"]
    one = {c: t for c, _, w, _, t, _ in sweep if w == 1}
    lines += [f"| {c}x | {n} | {w} | {r} | {t:.1f} | {t / r:.1f} | {tr:.1f} | "
              + (f"{one[c] / t:.2f}x |" if c in one else "- |") for c, n, w, r, t, tr in sweep]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.md").write_text(text)
    print(text)
    if args.ray:
        ray_comparison(args, tmp)


def timed_sweep(cfg) -> tuple[float, int]:
    from flows.pipeline import run_sweep

    t0 = time.perf_counter()
    out = run_sweep(cfg)
    return time.perf_counter() - t0, len(out.results)


def timed_extraction(args, tmp: Path, engine: str, actors: int = 1) -> tuple[int, float]:
    """The real ``extract()`` of ``--extract-rows`` Fashion rows into a fresh store: (rows, wall seconds)."""
    from stores.extraction import extract

    cfg = load_config(None, [
        "data.dataset=fashion", f"data.data_dir={DATA}", f"data.limit={args.extract_rows}",
        "encoders.image.kind=efficientnet_lite0", "encoders.text.kind=minilm",
        f"store.root={tmp}/extract-{engine}-{actors}/store", "store.index_min_rows=1000000000",
        f"store.extract_engine={engine}", f"ray.encode_actors={actors}"])
    t0 = time.perf_counter()
    rows = extract(cfg, progress=False).rows
    return rows, time.perf_counter() - t0


def ray_comparison(args, tmp: Path) -> None:
    """Sweep wall time on the process pool vs Ray (local cluster of 1 and 2 CPUs, one CPU per task) on ``--base``
    real Fashion pairs, and extraction with the ray engine (1 and 2 encoder actors) vs the local engine."""
    import ray
    from prefect import flow

    from stores.extraction import extract

    @flow
    def warm_up() -> None:
        """Start Prefect's local server outside the timings."""

    warm_up()
    cfg = config(manifest(args.base, 1, tmp / "ray"), tmp / "ray", epochs=args.epochs)
    rows = extract(cfg, progress=False).rows
    sweeps = []
    for w in args.workers if args.sweeps else []:
        sweeps.append(("process pool", w, None, *timed_sweep(cfg.model_copy(update={
            "sweep": cfg.sweep.model_copy(update={"max_parallel": w})}))))
        print(f"process pool, {w} workers: {sweeps[-1][3]:.1f} s", flush=True)
        t0 = time.perf_counter()
        ray.init(num_cpus=w, include_dashboard=False, logging_level="WARNING")
        start = time.perf_counter() - t0
        sweeps.append(("ray", w, start, *timed_sweep(cfg.model_copy(update={
            "sweep": cfg.sweep.model_copy(update={"runner": "ray"})}))))
        ray.shutdown()
        print(f"ray, {w} CPUs: {sweeps[-1][3]:.1f} s (+{start:.1f} s cluster start)", flush=True)

    ext = [("local (this process)", "-", *timed_extraction(args, tmp, "local"))]
    print(f"extract, local: {ext[-1][3]:.1f} s", flush=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="WARNING")
    start = time.perf_counter() - t0
    for actors in args.workers:
        ext.append(("ray", actors, *timed_extraction(args, tmp, "ray", actors)))
        print(f"extract, ray, {actors} actors: {ext[-1][3]:.1f} s", flush=True)
    ray.shutdown()
    lines = [f"### Process pool vs Ray: {rows} real Fashion pairs ({os.cpu_count()} CPU cores)\n",
             f"Sweep (early + srmm x 2 seeds = 4 runs, {args.epochs} epochs, MLflow sqlite + registry; Ray: a local "
             "cluster of that many CPUs, 1 CPU per task, started before the timing):\n",
             "| runner | workers | runs | wall (s) | s/run | cluster start (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r} | {w} | {n} | {t:.1f} | {t / n:.1f} | {'-' if s is None else f'{s:.1f}'} |"
              for r, w, s, t, n in sweeps]
    lines += ["", f"Extraction, the real `extract()` into a fresh store (Fashion, data.limit={args.extract_rows}, "
              "EfficientNet-Lite0 + MiniLM, no ANN index; the ray engine: one streaming Ray Data job, encoder actors "
              f"of 1 CPU each on a local cluster of {max(args.workers)} CPUs started before the timing "
              f"({start:.1f} s), actor start and encoder loading included):\n",
              "| engine | encoder actors | rows | wall (s) | rows/s |", "|---|---|---|---|---|"]
    lines += [f"| {e} | {a} | {n} | {t:.1f} | {n / t:.1f} |" for e, a, n, t in ext]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling-ray.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
