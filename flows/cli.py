"""``mm``: extract, query, store info, train, tune, evaluate, sweep, pipeline, compare, predict, serve, deploy."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _cfg(args):
    from models.config import load_config
    return load_config(args.config, args.set)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_extract(args) -> None:
    from flows.pipeline import extract_flow
    _print(extract_flow(_cfg(args), version=not args.no_dvc, max_rows=args.max_rows))


def cmd_info(args) -> None:
    from stores.feature_store import open_store
    _print(open_store(_cfg(args)).info())


def cmd_query(args) -> None:
    from stores.feature_store import open_store
    from stores.encoders import build_encoder

    cfg = _cfg(args)
    store = open_store(cfg)
    mod = args.modality or store.modalities[0]
    if args.id:
        vec = store.vector_of(args.id, mod)
    else:
        raw = args.text if args.text is not None else args.image or args.audio
        mod = "text" if args.text is not None else "image" if args.image else "audio"
        enc = build_encoder(mod, cfg.encoder_configs()[mod])
        vec = enc.encode([enc.load(raw)]).vec[0]
    clauses = [args.where] if args.where else []
    if args.split:
        clauses.append(f"split = '{args.split}'")
    if args.label is not None:
        classes = store.meta["classes"]
        label = classes.index(args.label) if args.label in classes else int(args.label)
        clauses.append(f"label = {label}")
    clauses += [f"{m}_present" for m in args.present or []]
    if args.id:
        clauses.append(f"id != '{args.id}'")
    hits = store.search(vec, mod, args.k, " AND ".join(f"({c})" for c in clauses) or None, exact=args.exact,
                        nprobes=args.nprobes)
    classes = store.meta["classes"]
    rows = [{"id": r["id"], "split": r["split"], "label": classes[r["label"]] if r["label"] >= 0 else None,
             "distance": round(r["_distance"], 4), "source": json.loads(r["source"])} for r in hits.to_pylist()]
    _print({"modality": mod, "neighbours": rows})


def cmd_train(args) -> None:
    from flows.pipeline import train_flow
    out = train_flow(_cfg(args))
    _print({k: out[k] for k in ("run_id", "variant", "seed", "train_pattern", "summary", "seconds")})


def cmd_tune(args) -> None:
    from flows.tuning import tune_flow
    out = tune_flow(_cfg(args), args.config)
    _print(out)
    for head, r in out.items():
        print(f"{head}: {r['path']}  (--set {' --set '.join(r['overrides'])})")


def cmd_evaluate(args) -> None:
    from flows.pipeline import evaluate_flow
    _print(evaluate_flow(_cfg(args), args.model))


def cmd_sweep(args) -> None:
    from flows.pipeline import run_sweep
    out = run_sweep(_cfg(args))
    _print({"report": out["report"], "champions": out["champions"]})
    print(Path(out["report"]).read_text())


def cmd_pipeline(args) -> None:
    from flows.pipeline import pipeline_flow
    out = pipeline_flow(_cfg(args), version=not args.no_dvc)
    _print({"extract": out["extract"], "report": out["report"], "champions": out["champions"]})
    print(Path(out["report"]).read_text())


def cmd_compare(args) -> None:
    from stores.tracking import compare_table, to_markdown
    cfg = _cfg(args)
    print(to_markdown(compare_table(cfg.tracking, cfg.tracking.experiment or cfg.data.dataset, args.metric)))


def cmd_predict(args) -> None:
    from stores.tracking import load_predictor
    predictor = load_predictor(args.model, _cfg(args).tracking)
    sample = {m: v for m, v in (("image", args.image), ("text", args.text), ("audio", args.audio)) if v is not None}
    _print(predictor.predict([sample]))


def cmd_serve(args) -> None:
    """Prefect server and MLflow UI on loopback, in the foreground until Ctrl-C."""
    cfg = _cfg(args)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    from stores.tracking import _uri
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(args.prefect_port)], env=env),
             subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                               str(args.mlflow_port), "--backend-store-uri", _uri(cfg.tracking),
                               "--default-artifact-root", Path(cfg.tracking.artifact_root).resolve().as_uri()], env=env)]
    print(f"Prefect UI: http://127.0.0.1:{args.prefect_port}  MLflow UI: http://127.0.0.1:{args.mlflow_port}\n"
          f"point flows at it: export PREFECT_API_URL=http://127.0.0.1:{args.prefect_port}/api")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()


def cmd_deploy(args) -> None:
    from flows.deploy import serve_deployments
    from models.config import load_config
    serve_deployments([load_config(c, args.set) for c in args.configs])


FLOW_COMMANDS = {"extract", "train", "evaluate", "sweep", "pipeline", "deploy", "tune"}


def check_prefect_api(timeout_s: float) -> None:
    """With PREFECT_API_URL set, that server must answer before a flow starts; unset, flows run on a temporary
    local server and need nothing."""
    from prefect.settings import PREFECT_API_URL
    from stores.health import wait_healthy

    url = PREFECT_API_URL.value()
    if url:
        wait_healthy(url.rstrip("/") + "/health", timeout_s, "Prefect API",
                     "start it (`prefect server start` or `mm serve`), or unset PREFECT_API_URL to run on a "
                     "temporary local server. Nothing ran and the feature store is untouched")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm", description=__doc__)
    p.add_argument("--connect-timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait for a configured Prefect API before failing (default 20)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("-c", "--config", help="YAML experiment file (configs/*.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. --set head.name=srmm --set train.epochs=5")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("extract", cmd_extract, "extract features into the LanceDB store (resumable) and version with DVC")
    sp.add_argument("--no-dvc", action="store_true")
    sp.add_argument("--max-rows", type=int)
    store = sub.add_parser("store", help="store commands").add_subparsers(dest="store_cmd", required=True)
    sp = store.add_parser("info", help="versions, row counts, fingerprint")
    sp.add_argument("-c", "--config")
    sp.add_argument("--set", action="append", default=[])
    sp.set_defaults(fn=cmd_info)
    sp = add("query", cmd_query, "nearest neighbours of an id, a text, an image or an audio clip")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--id")
    src.add_argument("--text")
    src.add_argument("--image")
    src.add_argument("--audio")
    sp.add_argument("--modality", help="vector column to search (with --id)")
    sp.add_argument("-k", type=int, default=5)
    sp.add_argument("--where", help="SQL filter, e.g. \"split = 'test'\"")
    sp.add_argument("--split")
    sp.add_argument("--label", help="class name or index")
    sp.add_argument("--present", action="append", help="require this modality present (repeatable)")
    sp.add_argument("--exact", action="store_true", help="bypass the ANN index")
    sp.add_argument("--nprobes", type=int, default=20, help="IVF partitions scanned (more: higher recall, slower)")
    add("train", cmd_train, "train one head under one pattern and seed; evaluate; register in MLflow")
    add("tune", cmd_tune, "equal-budget Optuna search per head (tune.heads) on the validation split; "
                          "writes configs/tuned/<dataset>-<head>.yaml")
    sp = add("evaluate", cmd_evaluate, "evaluate a registered model on the scenario grid")
    sp.add_argument("--model", required=True, help="e.g. models:/avmnist-mmp@champion")
    add("sweep", cmd_sweep, "heads x train patterns x seeds, in parallel; report and champions")
    sp = add("pipeline", cmd_pipeline, "extract -> DVC -> sweep -> report")
    sp.add_argument("--no-dvc", action="store_true")
    sp = add("compare", cmd_compare, "paper-style table of MLflow runs (mean +- sd over seeds)")
    sp.add_argument("--metric", default="acc")
    sp = add("predict", cmd_predict, "classify one sample with any modalities missing")
    sp.add_argument("--model", required=True)
    sp.add_argument("--image")
    sp.add_argument("--text")
    sp.add_argument("--audio")
    sp = add("serve", cmd_serve, "start the Prefect and MLflow servers on 127.0.0.1 for the UIs")
    sp.add_argument("--prefect-port", type=int, default=4200)
    sp.add_argument("--mlflow-port", type=int, default=5000)
    sp = sub.add_parser("deploy", help="serve the cron-scheduled deployments of one or more configs")
    sp.add_argument("configs", nargs="+")
    sp.add_argument("--set", action="append", default=[])
    sp.set_defaults(fn=cmd_deploy)
    return p


def main(argv: list[str] | None = None) -> None:
    import httpx

    from models.config import ConfigError
    from stores.datasets import DatasetError
    from stores.feature_store import StoreError
    from stores.health import ServiceUnreachable

    args = build_parser().parse_args(argv)
    try:
        if args.cmd in FLOW_COMMANDS:
            check_prefect_api(args.connect_timeout)
        args.fn(args)
    except (ConfigError, StoreError, DatasetError, ServiceUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except httpx.TransportError as e:  # the Prefect API lost mid-run: the traceback adds nothing
        print(f"error: lost the connection to the Prefect API ({e}). Every extracted batch already committed "
              "stays in the store; rerun the same command to resume", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
