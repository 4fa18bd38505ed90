"""``mm``: extract, query, store info, train, tune, evaluate, sweep, pipeline, protocol, compare, predict, serve,
deploy."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from flows import collector, prefect_server
from flows import console as out

out.quiet()  # before any third-party import; runs again in Prefect's worker processes (they import this module)
if __import__("multiprocessing").parent_process() is not None:  # a Prefect worker: its own server ends with it
    prefect_server.bind_to_this_process()


def _cfg(args):
    """The validated config of ``-c`` and ``--set``, loaded once (``main`` loads it before any heavy import, so
    a rejected value costs the config's own import, not Prefect's, MLflow's or the store's)."""
    if getattr(args, "_config", None) is None:
        from stores.config_files import load_config
        args._config = load_config(args.config, args.set)
    return args._config


def _show(args, result, human) -> None:
    """``--json``: the result as JSON on stdout; else ``human(result)`` renders it."""
    if args.json:
        out.emit_json(result)
    else:
        human(result)


def _sweep_output(args, cfg, swept, extra: dict | None = None) -> None:
    """A sweep's (``SweepResult``) table, champions and report; ``extra`` (the pipeline's extraction) first."""
    from models.metrics import primary_metric
    from runs.reporting import aggregate, json_rows
    metric = primary_metric("multilabel" if cfg.data.dataset == "mmimdb" else "multiclass")
    scenarios, rows = aggregate(swept.results, metric)
    result = {**(extra or {}), "report": swept.report, "sweep_run_id": swept.run_id,
              "champions": [c.as_dict() for c in swept.champions],
              "table": json_rows(scenarios, rows), "runs": [r.brief() for r in swept.results]}

    def human(res):
        if extra and "extract" in extra:
            out.extraction_line(extra["extract"])
        out.comparison(scenarios, rows, f"{cfg.data.dataset_name}: test {metric} (%) by modalities missing at test")
        if res["champions"]:
            out.note("champions (alias @champion): " + ", ".join(
                f"{c['model']} v{c['version']}" for c in res["champions"]))
        out.note(f"report: {out.path_link(res['report'])}, and in MLflow the sweep's run {res['sweep_run_id']} "
                 "(table, plot, its trainings nested)")
    _show(args, result, human)


def cmd_extract(args) -> None:
    """Runs after ``main`` asked the store's record (``unchanged_extraction``), so the flow does not ask again."""
    from flows.extraction import extract_flow
    _show(args, extract_flow(_cfg(args), version=not args.no_dvc, max_rows=args.max_rows, use_record=False).as_dict(),
          lambda r: out.key_values(r, title="extraction"))


def unchanged_extraction(args) -> bool:
    """``mm extract`` on a store whose record shows it up to date with unchanged shards
    (stores/extraction/freshness.py): the extraction's report without a flow run, and the DVC version when asked,
    made by the same call as the flow's task. False: the flow must run (and starts only then)."""
    if args.max_rows is not None:
        return False
    from models.records import Extraction
    from stores.extraction.freshness import unchanged_report
    if (report := unchanged_report(_cfg(args))) is None:
        return False
    version = None
    if not args.no_dvc:
        from stores.features import versioning
        version = versioning.version_store(_cfg(args).store, True)
    _show(args, Extraction(report, version).as_dict(), lambda r: out.key_values(r, title="extraction"))
    return True


def cmd_info(args) -> None:
    from models.errors import first_line
    from stores.features.admin import overview
    from stores.features.feature_store import StoreError, open_store
    from stores.features.location import StoreLocation
    cfg = _cfg(args)
    res = overview(StoreLocation.for_config(cfg.store))
    try:
        res["config"] = open_store(cfg).info().as_dict()
    except StoreError as e:  # the listing is still useful when this config's store is absent
        res["config"] = f"not extracted: {e}"
    except (OSError, RuntimeError) as e:  # Lance could not read it: say so, and exit non-zero
        _show(args, res, out.store_overview)
        raise StoreDamaged(f"store {cfg.store.root} cannot be read ({first_line(e, 200)}); "
                           "`mm store verify` names the damaged tables and rows") from None
    _show(args, res, out.store_overview)


class StoreDamaged(Exception):
    """A store whose Lance files cannot be read: exit 4."""


def cmd_verify(args) -> None:
    """Read every row of every table; exit 4 naming the damaged ones."""
    from stores.features.admin import verify
    from stores.features.location import StoreLocation
    res = verify(StoreLocation.for_config(_cfg(args).store))
    _show(args, res, lambda r: out.records(
        [{"table": n, "rows": t["rows"], "unreadable": ", ".join(t["unreadable"]) if isinstance(t["unreadable"], list)
          else t["unreadable"], "error": t["error"] or ""} for n, t in r["tables"].items()],
        title=f"verify {r['root']}"))
    if res["damaged"]:
        raise StoreDamaged(f"{len(res['damaged'])} damaged table(s) under {res['root']}: {', '.join(res['damaged'])}"
                           "; re-extract into a new store.root, or restore the store with DVC (dvc checkout data.dvc)")


def cmd_gc(args) -> None:
    from stores.features.admin import gc
    from stores.features.location import StoreLocation
    from stores.tracking.lineage import pinned_store_versions
    cfg = _cfg(args)
    pinned = pinned_store_versions(cfg.tracking)
    res = {"pinned_by_registered_runs": pinned,
           **gc(StoreLocation.for_config(cfg.store), pinned, force=args.force, older_than_s=args.older_than,
                lock_timeout_s=cfg.store.lock_timeout_s)}
    _show(args, res, lambda r: out.key_values(r, title="store gc"))


def cmd_migrate(args) -> None:
    from flows.extraction import migrate_flow
    _show(args, migrate_flow(_cfg(args)), lambda r: out.key_values(r, title="store migrate"))


def class_index(label: str, classes: list[str]) -> int:
    """``--label``: a class name of the store, or its index; anything else is one ConfigError line."""
    from models.config import ConfigError
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < len(classes):
        return int(label)
    shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
    raise ConfigError(f"--label {label!r} is neither a class of this store ({shown}) nor an index 0-{len(classes) - 1}")


def query_filter(args, classes: list[str]) -> str | None:
    """The Lance filter of ``mm query``'s options, built from typed values (stores/features/filters.py); ``--where`` is
    the user's own SQL and is ANDed in parenthesised."""
    from stores.features import filters
    clauses = [args.where]
    if args.split:
        clauses.append(filters.eq("split", args.split))
    if args.label is not None:
        clauses.append(filters.eq("label", class_index(args.label, classes)))
    clauses += [filters.eq(f"{m}_present", True) for m in args.present or []]
    if args.id:
        clauses.append(filters.ne("id", args.id))
    return filters.all_of(*clauses)


def cmd_query(args) -> None:
    from stores.encoders import build_encoder
    from stores.features.feature_store import open_store

    from models.config import ConfigError
    from stores.encoders import BadInput

    cfg = _cfg(args)
    store = open_store(cfg)
    mod = args.modality or store.modalities[0]
    if mod not in store.modalities:
        raise ConfigError(f"--modality {mod!r}: this store holds {', '.join(store.modalities)}")
    if args.id:
        vec = store.vector_of(args.id, mod)
    else:
        raw = args.text if args.text is not None else args.image or args.audio
        mod = "text" if args.text is not None else "image" if args.image else "audio"
        if mod not in store.modalities:
            raise ConfigError(f"--{mod}: this store holds {', '.join(store.modalities)}, not {mod}")
        enc = build_encoder(mod, cfg.encoder_configs()[mod])
        try:
            vec = enc.encode([enc.load(raw)]).vec[0]
        except BadInput as e:
            raise ConfigError(f"--{mod} {raw!r}: {e}") from None
    classes = store.meta.classes
    hits = store.search(vec, mod, args.k, query_filter(args, classes), exact=args.exact, nprobes=args.nprobes)
    rows = [{"id": r["id"], "split": r["split"], "label": classes[r["label"]] if r["label"] >= 0 else None,
             "distance": round(r["_distance"], 4), "source": json.loads(r["source"])} for r in hits.to_pylist()]
    _show(args, {"modality": mod, "neighbours": rows},
          lambda r: out.neighbours(r["neighbours"], title=f"nearest neighbours ({r['modality']})"))


def cmd_reproduce(args) -> None:
    """Re-run a logged run from its config and the store versions it read; its metrics beside the original."""
    from flows.pipeline import reproduce_flow
    res = reproduce_flow(_cfg(args), args.run_id, args.set).as_dict()  # --set: e.g. store.root when it moved
    _show(args, res, lambda r: (out.records(r["metrics"], title=f"reproduce {r['run_id']}"),
                                out.note(f"identical: {r['identical']}; versions: {r['versions']}")))


def cmd_train(args) -> None:
    from flows.pipeline import train_flow
    with out.training_progress(not args.json):
        res = train_flow(_cfg(args))
    _show(args, res.brief(), lambda r: out.key_values(r, title="run"))


def cmd_tune(args) -> None:
    from flows.tuning import tune_flow
    res = {h: r.summary() for h, r in tune_flow(_cfg(args), args.config).items()}

    def human(r):
        out.records([{"head": h, "best config": v["path"], "overrides": " ".join(f"--set {o}" for o in v["overrides"])}
                     for h, v in r.items()], title="tuned (validation split only)")
    _show(args, res, human)


def cmd_evaluate(args) -> None:
    from flows.pipeline import evaluate_flow

    def human(r):
        out.key_values({"model": r["model_uri"], **r["summary"]}, title="summary")
        out.records([{"scenario": s, **m} for s, m in r["scenarios"].items()], title="test scenarios")
    _show(args, evaluate_flow(_cfg(args), args.model).as_dict(), human)


def cmd_sweep(args) -> None:
    from flows.pipeline import run_sweep
    cfg = _cfg(args)
    with out.training_progress(not args.json):
        swept = run_sweep(cfg)
    _sweep_output(args, cfg, swept)


def cmd_pipeline(args) -> None:
    from flows.pipeline import pipeline_flow
    cfg = _cfg(args)
    with out.training_progress(not args.json):
        res = pipeline_flow(cfg, version=not args.no_dvc)
    _sweep_output(args, cfg, res.sweep, {"extract": res.extract.as_dict()})


def cmd_protocol(args) -> None:
    """A paper's protocol preset: its runs as one sweep, its tables, the paper's published rows beside them."""
    from flows.protocol import protocol_flow
    cfg = _cfg(args)
    with out.training_progress(not args.json):
        res = protocol_flow(cfg, args.preset, args.heads, args.seeds, args.epochs, not args.no_paper_rows)

    def human(r):
        con = out.console()  # soft_wrap: a Markdown table's rows stay one line each
        con.print(f"{r['preset']}: {r['source']}; {r['dataset']}, test {r['metric']} (%), mean ± sd over seeds")
        for line in r["notes"]:
            con.print(f"  - {line}")
        for s in r["sections"]:
            con.print(f"\n### {s['title']}\n\n{s['table']}", soft_wrap=True)
        out.note(r["note"])
        out.note(f"report: {out.path_link(r['report'])}, and in MLflow the sweep's run {r['sweep_run_id']}")
    _show(args, res, human)


def cmd_compare(args) -> None:
    from runs.reporting import aggregate, json_rows
    from stores.tracking.runs import experiment_name, run_results
    cfg = _cfg(args)
    experiment = experiment_name(cfg.tracking, cfg.data.dataset_name)
    scenarios, rows = aggregate(run_results(cfg.tracking, experiment, args.metric), args.metric)
    _show(args, {"experiment": experiment, "metric": args.metric, "table": json_rows(scenarios, rows)},
          lambda r: out.comparison(scenarios, rows, f"{experiment}: test {args.metric} (%)"))


def cmd_predict(args) -> None:
    from stores.tracking.runs import load_predictor
    predictor = load_predictor(args.model, _cfg(args).tracking)
    sample = {m: v for m, v in (("image", args.image), ("text", args.text), ("audio", args.audio)) if v is not None}
    _show(args, predictor.predict([sample]), lambda r: out.records(r, title="prediction"))


def cmd_serve(args) -> None:
    """Prefect server and MLflow UI on loopback, in the foreground until Ctrl-C."""
    cfg = _cfg(args)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    from stores.tracking.runs import artifact_uri, runs_page, tracking_uri
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(args.prefect_port)], env=env),
             subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                               str(args.mlflow_port), "--backend-store-uri", tracking_uri(cfg.tracking),
                               "--default-artifact-root", artifact_uri(cfg.tracking)], env=env)]
    runs = runs_page(cfg.tracking, cfg.data.dataset_name, f"http://127.0.0.1:{args.mlflow_port}")
    api = f"http://127.0.0.1:{args.prefect_port}/api"
    print(f"Prefect UI: http://127.0.0.1:{args.prefect_port}  MLflow UI: {runs}\n"
          + ("other mm commands on this machine now run their flows here" if api == prefect_server.LOCAL_URL else
             f"point flows at it: export PREFECT_API_URL={api}"))
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
    from stores.config_files import load_config
    serve_deployments([load_config(c, args.set) for c in args.configs])


ENCODING_COMMANDS = {"extract", "pipeline"}  # build the configured encoders
FLOW_COMMANDS = {"extract", "migrate", "train", "reproduce", "evaluate", "sweep", "pipeline", "deploy", "tune",
                 "protocol"}
PIPELINE = ("flows.pipeline",)  # what the training commands import (flows.collector imports it first)


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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm", description=__doc__)
    p.add_argument("--connect-timeout", type=_seconds, default=20.0, metavar="S",
                   help="seconds to wait for a configured Prefect API before failing (default 20)")
    sub = p.add_subparsers(dest="cmd", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable result on stdout, no progress display")
    common.add_argument("--debug", action="store_true", help="full tracebacks and third-party logs")

    def add(name, fn, help_, parent=sub, needs: tuple[str, ...] = ()):
        """``needs``: the modules ``fn`` imports beyond ``main``'s own (flows.collector imports them first)."""
        sp = parent.add_parser(name, help=help_, parents=[common])
        sp.add_argument("-c", "--config", help="YAML experiment file (configs/*.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. --set head.name=srmm --set train.epochs=5")
        sp.set_defaults(fn=fn, needs=needs)
        return sp

    sp = add("extract", cmd_extract, "extract features into the LanceDB store (resumable) and version with DVC",
             needs=("flows.extraction",))
    sp.add_argument("--no-dvc", action="store_true")
    sp.add_argument("--max-rows", type=_positive)
    store = sub.add_parser("store", help="store commands").add_subparsers(dest="store_cmd", required=True)
    add("info", cmd_info, "views, dataset tables, versions, sizes and the configs using them", parent=store)
    add("verify", cmd_verify, "read every row of every table; exit 4 naming damaged tables and rows", parent=store)
    sp = add("gc", cmd_gc, "remove old Lance versions and unused views (never a registered run's pinned version "
                           "unless --force)", parent=store)
    sp.add_argument("--force", action="store_true", help="also remove versions registered runs read")
    sp.add_argument("--older-than", type=float, default=3600.0, metavar="S",
                    help="keep versions younger than S seconds (readers may still use them; default 3600)")
    add("migrate", cmd_migrate, "convert an old-layout store into views (no re-encoding)", parent=store,
        needs=("flows.extraction",))
    sp = add("query", cmd_query, "nearest neighbours of an id, a text, an image or an audio clip",
             needs=("stores.encoders",))
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--id")
    src.add_argument("--text")
    src.add_argument("--image")
    src.add_argument("--audio")
    sp.add_argument("--modality", help="vector column to search (with --id)")
    sp.add_argument("-k", type=_positive, default=5)
    sp.add_argument("--where", help="SQL filter, e.g. \"split = 'test'\"")
    sp.add_argument("--split", choices=["train", "val", "test"])
    sp.add_argument("--label", help="class name or index")
    sp.add_argument("--present", action="append", help="require this modality present (repeatable)")
    sp.add_argument("--exact", action="store_true", help="bypass the ANN index")
    sp.add_argument("--nprobes", type=_positive, default=20,
                    help="IVF partitions scanned (more: higher recall, slower)")
    add("train", cmd_train, "train one head under one pattern and seed; evaluate; register in MLflow",
        needs=PIPELINE)
    sp = add("reproduce", cmd_reproduce, "re-run a logged run on the store versions it read; compare metrics",
             needs=PIPELINE)
    sp.add_argument("run_id")
    add("tune", cmd_tune, "equal-budget Optuna search per head (tune.heads) on the validation split; "
                          "writes configs/tuned/<dataset>-<head>.yaml", needs=("flows.tuning",))
    sp = add("evaluate", cmd_evaluate, "evaluate a registered model on the scenario grid", needs=PIPELINE)
    sp.add_argument("--model", required=True, help="e.g. models:/avmnist-mmp@champion")
    add("sweep", cmd_sweep, "heads x train patterns x seeds, in parallel; report and champions", needs=PIPELINE)
    sp = add("pipeline", cmd_pipeline, "extract -> DVC -> sweep -> report", needs=PIPELINE)
    sp.add_argument("--no-dvc", action="store_true")
    from models.protocol_presets import PRESETS
    sp = add("protocol", cmd_protocol, "run a paper's protocol preset (map-v1: 001 Tables 1 and 6; srmm-table6-v1: "
                                       "004 Table VI; mmp-table3-v1: 000 Table III); published rows beside ours "
                                       "on food101 / mmimdb", needs=("flows.protocol",))
    sp.add_argument("preset", choices=list(PRESETS))
    sp.add_argument("--seeds", nargs="+", type=int, help="default: the preset's")
    sp.add_argument("--epochs", type=_positive, help="default: the preset's (else the config's)")
    sp.add_argument("--heads", nargs="+", help="default: the preset's (oracle: one per modality)")
    sp.add_argument("--no-paper-rows", action="store_true", help="leave out the paper-constants rows")
    sp = add("compare", cmd_compare, "paper-style table of MLflow runs (mean +- sd over seeds, grid mean)",
             needs=("runs.reporting", "stores.tracking.runs"))
    sp.add_argument("--metric", default="acc")
    sp = add("predict", cmd_predict, "classify one sample with any modalities missing", needs=("stores.tracking.runs",))
    sp.add_argument("--model", required=True)
    sp.add_argument("--image")
    sp.add_argument("--text")
    sp.add_argument("--audio")
    sp = add("serve", cmd_serve, "start the Prefect and MLflow servers on 127.0.0.1 for the UIs")
    sp.add_argument("--prefect-port", type=int, default=4200)
    sp.add_argument("--mlflow-port", type=int, default=5000)
    sp = sub.add_parser("deploy", help="serve the cron-scheduled deployments of one or more configs", parents=[common])
    sp.add_argument("configs", nargs="+")
    sp.add_argument("--set", action="append", default=[])
    sp.set_defaults(fn=cmd_deploy, needs=("flows.deploy",))
    return p


def disk_full(e: BaseException) -> bool:
    """No space left (ENOSPC) or over the file size limit (EFBIG), as an OSError or as Lance's text of one."""
    import errno
    text = str(e)
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "os error 28)" in text or \
        "os error 27)" in text or "No space left on device" in text


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out.quiet(args.debug)
    from models.config import ConfigError
    if hasattr(args, "config") and hasattr(args, "set"):  # a bad value is refused before the heavy imports below
        try:
            cfg = _cfg(args)
            if args.cmd in ENCODING_COMMANDS:
                from stores.config_files import check_encoder_paths
                check_encoder_paths(cfg)
        except ConfigError as e:
            if args.debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    import httpx

    from stores.datasets import DatasetError
    from stores.features.feature_store import StoreError
    from stores.health import ServiceUnreachable

    try:
        if args.cmd == "extract" and unchanged_extraction(args):
            pass
        elif args.cmd in FLOW_COMMANDS:  # `mm serve`'s server when it runs, else a temporary one ending with this
            with prefect_server.flow_api():
                check_prefect_api(args.connect_timeout)
                collector.imported(*args.needs)
                args.fn(args)
        else:
            collector.imported(*args.needs)
            args.fn(args)
    except (ConfigError, StoreError, DatasetError, ServiceUnreachable) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoreDamaged as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    except (OSError, RuntimeError) as e:
        from models.errors import first_line
        from stores.features.location import is_damage
        if not args.debug and disk_full(e):
            print(f"error: the disk refused a write ({first_line(e, 160)}); every batch already committed "
                  "is kept: free space (or raise the file size limit) and rerun the same command to resume",
                  file=sys.stderr)
            sys.exit(5)
        if not args.debug and str(e).startswith("Timed out while attempting to connect to ephemeral Prefect"):
            print("error: the temporary Prefect server did not answer within "
                  f"{os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')} s (a loaded machine, or a "
                  "disk it cannot write): raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with "
                  "`mm serve` and set PREFECT_API_URL", file=sys.stderr)
            sys.exit(3)
        if args.debug or not is_damage(e):
            raise
        print(f"error: a store file cannot be read ({first_line(e, 160)}); `mm store verify` names the "
              "damaged tables and rows; re-extract into a new store.root or restore it with DVC", file=sys.stderr)
        sys.exit(4)
    except httpx.TransportError as e:  # the Prefect API lost mid-run: the traceback adds nothing
        if args.debug:
            raise
        print(f"error: lost the connection to the Prefect API ({e}). Every extracted batch already committed "
              "stays in the store; rerun the same command to resume", file=sys.stderr)
        sys.exit(3)


def run() -> None:
    """The ``mm`` console script: ``main`` under the command-line process's collector policy (flows.collector)."""
    with collector.running():
        main()


if __name__ == "__main__":
    run()
