"""Store management: what is in a store root (views, dataset tables, configs, versions, sizes, who uses what) and
garbage collection of old Lance versions and unused views that never touches a version a registered model's
run read."""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from models.errors import first_line
from stores.features.history import KEEP_EVERY_VERSION, RUN_TAG, prune
from stores.features.location import StoreLocation

PIN_TAG = "pinned-v"  # Lance tag on each version a registered run read: Lance itself refuses to clean it up
VERIFY_ROWS = 256  # rows read at once by ``verify`` (token views: ~125 KB a row with a real encoder)


def _metas(loc: StoreLocation) -> dict[str, dict]:
    out = {}
    for name in loc.files(".json"):
        f = loc.file(name)
        try:
            meta = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            out[f.stem] = meta
    return out


def overview(root: Path | str | StoreLocation) -> dict:
    """Every Lance table under ``root`` with its kind, latest version, versions kept, size, tags, and for views
    and dataset tables the configs that use them."""
    loc = StoreLocation.of(root)
    db = loc.connect()
    metas = _metas(loc)
    configs = {n: m for n, m in metas.items() if m.get("kind") == "config"}
    users: dict[str, list[str]] = {}
    for n, m in configs.items():
        for t in [m["dataset"], *m["views"].values()]:
            users.setdefault(t, []).append(n)
    tables = {}
    for name in db.list_tables().tables:
        tbl = db.open_table(name)
        meta = metas.get(name, {})
        kind = meta.get("kind") or ("masks" if name.endswith("-masks") else
                                    "legacy" if "fingerprint" in meta else "other")
        tables[name] = {"kind": kind, "version": tbl.version, "versions_kept": len(tbl.list_versions()),
                        "rows": tbl.count_rows(), "bytes": loc.size(f"{name}.lance"),
                        "pinned": sorted(int(t["version"]) for n, t in tbl.tags.list().items()
                                         if n.startswith(PIN_TAG)),
                        "used_by": users.get(name, [name] if kind == "config" else [])}
        if kind == "view":
            tables[name]["modality"] = meta["modality"]
            tables[name]["encoder"] = meta["encoder"]
    return {"root": str(loc), "tables": tables}


def verify(root: Path | str | StoreLocation) -> dict:
    """Read every column of every row of every table under ``root``, ``VERIFY_ROWS`` at a time, and name what
    cannot be read: the table and its unreadable row ranges (a truncated or corrupted data file). LanceDB exposes
    no per-fragment reader without the separate ``pylance`` package, so rows are addressed by offset."""
    loc = StoreLocation.of(root)
    db = loc.connect()
    tables, damaged = {}, []
    for name in db.list_tables().tables:
        try:
            tbl = db.open_table(name)
            n = tbl.count_rows()
        except Exception as e:  # noqa: BLE001 - whatever Lance raises, the table is what is reported
            tables[name] = {"rows": None, "unreadable": "all", "error": first_line(e)}
            damaged.append(name)
            continue
        bad, error = [], None
        for start in range(0, n, VERIFY_ROWS):
            stop = min(n, start + VERIFY_ROWS)
            try:
                tbl.take_offsets(list(range(start, stop))).to_arrow()
            except Exception as e:  # noqa: BLE001
                error = error or first_line(e)
                if bad and bad[-1][1] == start:
                    bad[-1][1] = stop
                else:
                    bad.append([start, stop])
        tables[name] = {"rows": n, "unreadable": [f"rows {a}-{b - 1}" for a, b in bad], "error": error}
        if bad:
            damaged.append(name)
    return {"root": str(loc), "tables": tables, "damaged": damaged}


def _pins(pinned_runs: list[dict]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for run in pinned_runs:
        for table, version in run["tables"].items():
            out.setdefault(table, set()).add(int(version))
    return out


def gc(root: Path | str | StoreLocation, pinned_runs: list[dict], force: bool = False, older_than_s: float = 3600.0,
       lock_timeout_s: float = 0.0) -> dict:
    """Remove Lance versions older than ``older_than_s`` and views no config uses. A version that a registered
    model's run read (``pinned_runs``, from stores/tracking/lineage.py) is kept and tagged so Lance's cleanup
    keeps it (and the files it reads); the unpinned versions between pins go. ``force`` drops those tags and
    removes pinned versions and views too."""
    loc = StoreLocation.of(root)
    db = loc.connect()
    pins = {} if force else _pins(pinned_runs)
    metas = _metas(loc)
    used = {t for m in metas.values() if m.get("kind") == "config" for t in [m["dataset"], *m["views"].values()]}
    report: dict = {"tables": {}, "dropped_views": []}
    for name in db.list_tables().tables:
        with loc.lock(name, lock_timeout_s, hint="run gc when it is done"):
            meta = metas.get(name, {})
            if meta.get("kind") == "view" and name not in used and name not in pins:
                db.drop_table(name)
                loc.file(f"{name}.json").unlink(missing_ok=True)
                report["dropped_views"].append(name)
                continue
            report["tables"][name] = _clean_table(loc, db.open_table(name), pins.get(name, set()), older_than_s)
    return report


def _clean_table(loc: StoreLocation, tbl, pinned: set[int], older_than_s: float) -> dict:
    before = [v["version"] for v in tbl.list_versions()]
    stamps = {v["version"]: v["timestamp"] for v in tbl.list_versions()}
    for tag, t in list(tbl.tags.list().items()):  # pins of runs no longer registered are released
        if tag.startswith(PIN_TAG) and int(t["version"]) not in pinned:
            tbl.tags.delete(tag)
    kept = sorted(v for v in pinned if v in stamps)
    for v in kept:
        if f"{PIN_TAG}{v}" not in tbl.tags.list():
            tbl.tags.create(f"{PIN_TAG}{v}", v)
    age = timedelta(seconds=older_than_s)  # pinned versions are kept by their tags, whatever their age
    cutoff = datetime.now() - age
    for tag, t in list(tbl.tags.list().items()):  # the history of extractions older than the cutoff goes too
        if tag.startswith(RUN_TAG) and int(t["version"]) != tbl.version and stamps[int(t["version"])] < cutoff:
            tbl.tags.delete(tag)
    tbl.optimize(cleanup_older_than=KEEP_EVERY_VERSION)  # compaction and index update; the cleanup is prune's
    prune(loc, tbl.name, age)
    after = [v["version"] for v in tbl.list_versions()]
    return {"versions_before": len(before), "versions_after": len(after), "pinned": kept,
            "removed": sorted(set(before) - set(after))}
