"""A rerun with nothing to extract, answered from the store's record instead of a pass over the source.

After a complete extraction of a local sharded source whose every image/audio input is inside its shards
(Parquet or Arrow bytes, WebDataset samples; text is always inline), the store's config meta records the shards'
listing (path, size, modification time in ns), the data config, the encoders' fingerprints and the tables' Lance
versions (``record``). A later ``mm extract`` whose listing, configs and versions are all equal has nothing to
do: the shards' bytes are the whole input, and nothing has written to the tables since (``unchanged_report``,
which ``extract`` asks first, and ``mm extract`` before it starts any flow). Like make or rsync it trusts the
listing: bytes rewritten with the same size and the old mtime put back are not seen.
Anything else runs the extraction as before: a source that names per-item files (only a stat of every file would
show their changes, which is the extraction's own first pass), an object-store source (its listing has second
resolution), a partial run (``--max-rows``), any difference or any doubt. So ``mm extract`` on an unchanged
store returns without a Prefect flow run (issue 21's fixed costs: that run is most of a no-op's time)."""
from __future__ import annotations

import time
from typing import Any

from models.config import DataConfig, ExperimentConfig, runtime_fields
from models.records import ExtractReport
from stores.encoders import encoder_fingerprint
from stores.features.feature_store import FeatureStore

KEY = "unchanged_since"  # the record's key in the store's config meta


def data_config(cfg: ExperimentConfig) -> dict:
    """What defines the rows read from shards: the data config without its runtime fields (``data_dir``, which a
    shard source does not read, and ``allowed_roots``, which only per-item files need)."""
    return cfg.data.model_dump(mode="json", exclude=runtime_fields(DataConfig))


def current_versions(store: FeatureStore) -> dict[str, int]:
    """The latest Lance version of the dataset table, each view and the search table."""
    return {**store.versions(), "search": int(store.table.version)}


def record(cfg: ExperimentConfig, store: FeatureStore, listing: list[list] | None, report: dict[str, Any]) -> dict | None:
    """What a complete extraction leaves for the next one to compare (None: the source does not qualify)."""
    if listing is None:
        return None
    mods = store.modalities
    return {"listing": listing, "data": data_config(cfg),
            "encoders": {m: encoder_fingerprint(m, cfg.encoder_configs()[m]) for m in mods},
            "versions": current_versions(store), "report": report}


def unchanged_report(cfg: ExperimentConfig) -> ExtractReport | None:
    """The report of an extraction with nothing to do, when the store's record shows nothing can have changed;
    None when the extraction must run (it then finds out, and reports errors, itself)."""
    t0 = time.perf_counter()
    if cfg.data.dataset != "manifest" or cfg.store.versions:
        return None
    try:
        from stores.datasets.sources import Source
        source = Source(cfg.data)
        if source.remote:
            return None
        store = FeatureStore.for_config(cfg)  # its modalities from the dataset table's record: no shard is read
        if not store.meta_path.exists() or not (rec := store.config_meta.get(KEY)):
            return None
        mods = store.modalities
        same = (rec["listing"] == source.listing() and rec["data"] == data_config(cfg)
                and rec["encoders"] == {m: encoder_fingerprint(m, cfg.encoder_configs()[m]) for m in mods}
                and rec["versions"] == current_versions(store))
    except Exception:  # noqa: BLE001 - any doubt (a damaged table, an unreadable shard): the extraction runs
        return None
    if not same:
        return None
    versions = {k: v for k, v in rec["versions"].items() if k != "search"}
    r = rec["report"]
    return ExtractReport(store.name, r["fingerprint"], 0, r["source_rows"], r["rows"], versions["dataset"],
                         r["missing_counts"], time.perf_counter() - t0, {}, r["indices"], {m: 0 for m in mods},
                         0, 0, versions, 0.0)
