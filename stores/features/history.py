"""Which Lance versions a store keeps. An extraction commits once per ``store.write_every`` rows and table, and each
commit's manifest lists every fragment written so far, so keeping every version costs N^2 bytes (563 MB of
manifests at 128k rows, bench/RESULTS.md). Kept: the version each extraction ends on, tagged ``extract-v<N>``
(the store's history: ``store.versions`` pins them, runs record them); every version ``mm store gc`` tagged for a
registered model (``pinned-v<N>``); the latest; and any version younger than ``store.version_grace_s`` (a reader
may be on it). The rest, the commits in between, go at the end of each extraction.

Lance's own cleanup, through pylance: it skips tagged versions (``error_if_tagged_old_versions=False``), which
lancedb's ``optimize(cleanup_older_than=...)`` cannot (it refuses to run while an older version is tagged)."""
from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Callable

from stores.features.location import StoreLocation

RUN_TAG = "extract-v"
# LanceDB's optimize (compaction, index update) also removes versions older than its cleanup age (7 days by
# default); compaction keeps them all: which versions go is this module's decision
KEEP_EVERY_VERSION = timedelta(days=365_000)


def tag_run_version(tbl) -> int:
    """Tag ``tbl``'s latest version as one an extraction ended on; returns it."""
    v = tbl.version
    if f"{RUN_TAG}{v}" not in tbl.tags.list():
        tbl.tags.create(f"{RUN_TAG}{v}", v)
    return v


def prune(loc: StoreLocation, name: str, older_than: timedelta) -> int:
    """Remove the untagged versions of table ``name`` older than ``older_than`` (and the files only they used);
    returns how many went."""
    ds = loc.lance_dataset(name)
    with warnings.catch_warnings():  # an age of 0 is the caller's choice (tests, `mm store gc --older-than 0`)
        warnings.simplefilter("ignore", UserWarning)
        stats = ds.cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
    return int(stats.old_versions)


def keep_run_versions(loc: StoreLocation, names: list[str], grace_s: float,
                      after_each: Callable[[], object] = lambda: None) -> dict[str, int]:
    """At the end of an extraction: tag each table's final version and prune the untagged ones older than
    ``grace_s``, calling ``after_each`` after each table. Returns the versions each table keeps."""
    db = loc.connect()
    out = {}
    for name in names:
        tbl = db.open_table(name)
        tag_run_version(tbl)
        prune(loc, name, timedelta(seconds=grace_s))
        out[name] = len(db.open_table(name).list_versions())
        after_each()
    return out
