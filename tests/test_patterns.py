import numpy as np
import pytest

from models.patterns import MissingPattern, presence_mask, robustness_grid, scenario_slug

MODS = ["image", "text"]


def test_per_modality_rates_are_exact_and_seeded():
    p = MissingPattern(kind="per_modality", rates={"image": 0.3, "text": 0.5})
    a = presence_mask(p, MODS, 1000, "train", 0)
    assert a.shape == (1000, 2)
    assert np.array_equal(a, presence_mask(p, MODS, 1000, "train", 0))
    assert not np.array_equal(a, presence_mask(p, MODS, 1000, "train", 1))
    assert not np.array_equal(a, presence_mask(p, MODS, 1000, "test", 0))
    assert a.any(1).all()  # nobody loses every modality unless allowed
    assert abs((~a[:, 0]).mean() - 0.3) < 0.03 and abs((~a[:, 1]).mean() - 0.5) < 0.06


def test_allow_all_missing_keeps_rows_empty():
    p = MissingPattern(kind="per_modality", rates={"image": 0.5, "text": 0.5}, allow_all_missing=True)
    a = presence_mask(p, MODS, 1000, "test", 0)
    assert (~a.any(1)).sum() > 100


def test_map_protocol_both_splits_eta_disjointly():
    p = MissingPattern(kind="map", eta=0.7, mp_type="both")
    a = presence_mask(p, MODS, 1000, "train", 0)
    assert (~a[:, 0]).sum() == 350 and (~a[:, 1]).sum() == 350
    assert a.any(1).all()
    single = presence_mask(MissingPattern(kind="map", eta=0.7, mp_type="text"), MODS, 1000, "train", 0)
    assert (~single[:, 1]).sum() == 700 and single[:, 0].all()


def test_simultaneous_absent_noise_and_many_modalities():
    mods = ["image", "text", "audio"]
    sim = presence_mask(MissingPattern(kind="simultaneous", rate=0.2), mods, 500, "test", 0)
    assert (~sim.any(1)).sum() == 100 and (sim.all(1) | ~sim.any(1)).all()
    absent = presence_mask(MissingPattern(kind="absent", modality="audio"), mods, 50, "test", 0)
    assert not absent[:, 2].any() and absent[:, :2].all()
    noise = presence_mask(MissingPattern(kind="noise", sigma=0.5), mods, 50, "test", 0)
    assert noise.all()
    grid = robustness_grid(mods, [0.0, 0.5, 1.0])
    assert len(grid) == 1 + 3 * 2


def test_unknown_modality_is_rejected():
    with pytest.raises(ValueError, match="unknown modalities"):
        presence_mask(MissingPattern(kind="absent", modality="video"), MODS, 10, "test", 0)


def test_scenario_slugs_are_mlflow_safe_and_distinct():
    from mlflow.utils.validation import validate_param_and_metric_name as ok
    pats = [MissingPattern(), MissingPattern(kind="per_modality", rates={"image": 0.3}),
            MissingPattern(kind="map", eta=0.7), MissingPattern(kind="simultaneous", rate=0.5),
            MissingPattern(kind="noise", sigma=0.1)]
    slugs = [scenario_slug(p, MODS) for p in pats]
    assert slugs[0] == "image-000/text-000" and slugs[1] == "image-030/text-000"
    assert len(set(slugs)) == len(slugs) and all(ok(f"test/acc/{s}") for s in slugs)
    assert scenario_slug(MissingPattern(kind="absent", modality="text"), MODS) == "image-000/text-100"


def test_missing_by_class_meets_each_class_rate_exactly_and_is_seeded():
    labels = ["cat"] * 300 + ["dog"] * 200 + ["eel"] * 100
    p = MissingPattern(kind="by_class", modality="text", class_rates={"cat": 0.8, "dog": 0.1}, rate=0.5)
    a = presence_mask(p, MODS, 600, "train", 0, labels)
    missing = {c: int((~a[np.array(labels) == c, 1]).sum()) for c in ("cat", "dog", "eel")}
    assert missing == {"cat": 240, "dog": 20, "eel": 50} and a[:, 0].all()
    assert np.array_equal(a, presence_mask(p, MODS, 600, "train", 0, labels))
    assert not np.array_equal(a, presence_mask(p, MODS, 600, "train", 1, labels))
    with pytest.raises(ValueError, match="needs them"):
        presence_mask(p, MODS, 600, "train", 0)
    with pytest.raises(ValueError, match="must lie in"):
        MissingPattern(kind="by_class", modality="text", class_rates={"cat": 1.5})


def test_missing_by_a_column_meets_each_values_rate_exactly_and_is_seeded():
    site = ["a"] * 300 + ["b"] * 200 + [None] * 100  # rows without a value take ``rate``, as other values do
    p = MissingPattern(kind="by_column", modality="image", column="site", column_rates={"a": 0.9, "b": 0.05},
                       rate=0.3)
    a = presence_mask(p, MODS, 600, "train", 0, site)
    groups = np.array(site, dtype=object)
    missing = {g: int((~a[groups == g, 0]).sum()) for g in ("a", "b", None)}
    assert missing == {"a": 270, "b": 10, None: 30} and a[:, 1].all()
    assert np.array_equal(a, presence_mask(p, MODS, 600, "train", 0, site))
    assert not np.array_equal(a, presence_mask(p, MODS, 600, "train", 1, site))
    assert p.key == "by_column[image|site:a=90,b=5,else=30]" and "/" not in scenario_slug(p, MODS)
    with pytest.raises(ValueError, match="values of column 'site'"):
        presence_mask(p, MODS, 600, "train", 0)
    with pytest.raises(ValueError, match="needs `column`"):
        MissingPattern(kind="by_column", modality="image", rate=0.3)


def test_missing_in_bursts_of_consecutive_rows():
    p = MissingPattern(kind="burst", modality="image", rate=0.3, burst_len=25)
    a = presence_mask(p, MODS, 1000, "test", 0)
    gone = ~a[:, 0]
    assert gone.sum() == 300 and a[:, 1].all()
    starts = np.flatnonzero(gone & ~np.concatenate([[False], gone[:-1]]))
    assert len(starts) <= 300 // 25  # 12 runs of 25, merged where they touch: never scattered rows
    assert not np.array_equal(a, presence_mask(p, MODS, 1000, "test", 1))
    short = presence_mask(MissingPattern(kind="burst", modality="text", rate=0.07, burst_len=5), MODS, 100, "val", 0)
    assert (~short[:, 1]).sum() == 7  # a run of 5 and one of 2
    slugs = {scenario_slug(q, MODS) for q in (p, MissingPattern(kind="by_class", modality="text", rate=0.2))}
    assert len(slugs) == 2 and all("/" not in s and " " not in s for s in slugs)


def test_a_class_dependent_pattern_reads_the_stores_labels(colour_store):
    from stores.features.feature_store import FeatureStore, StoreError
    from stores.features.scenarios import ScenarioReader
    cfg, report = colour_store
    reader = ScenarioReader(FeatureStore(cfg.store.root, report.store), ("vec",), seed=0)
    p = MissingPattern(kind="by_class", modality="image", class_rates={"class0": 1.0, "class1": 0.0}, rate=0.5)
    split = reader.split("train")
    present = reader.under("train", p).present.numpy()
    names = np.array(reader.class_names(split, p))
    assert not present[names == "class0", 0].any() and present[names == "class1", 0].all()
    assert (~present[names == "class2", 0]).sum() == round(0.5 * (names == "class2").sum())
    with pytest.raises(StoreError, match=r"classes \['kitten'\]"):
        reader.under("train", MissingPattern(kind="by_class", modality="image", class_rates={"kitten": 0.3}))


def test_protection_horizon_is_the_first_test_rate_where_a_head_falls_below_each_reference(tmp_path):
    from models.records import RunRow
    from runs.gap import protection_horizon
    from runs.reporting import write_report
    rates = [0.0, 0.25, 0.5, 0.75, 1.0]

    def run(variant, accs_image_missing):
        scenarios = {scenario_slug(MissingPattern(kind="per_modality", rates={"image": r}), MODS): {"acc": a}
                     for r, a in zip(rates, accs_image_missing)}
        scenarios[scenario_slug(MissingPattern(kind="absent", modality="text"), MODS)] = {"acc": 0.5}
        return RunRow(variant, "complete", 0, scenarios, {})
    runs = [run("oracle[only:text]", [0.8] * 5), run("moddrop", [0.9, 0.85, 0.8, 0.75, 0.7]),
            run("early", [0.92, 0.8, 0.7, 0.6, 0.5]), run("mmp", [0.93, 0.9, 0.88, 0.86, 0.85])]
    horizon = protection_horizon(runs, "acc")
    assert horizon["early"]["oracle_image"] == 0.5 and horizon["early"]["moddrop_image"] == 0.25
    assert horizon["moddrop"]["oracle_image"] == 0.75 and horizon["moddrop"]["moddrop_image"] is None
    assert horizon["mmp"] == {"oracle_image": None, "moddrop_image": None, "oracle_text": None,
                              "moddrop_text": None}
    report = write_report(runs, tmp_path, "horizon").read_text()
    assert "## Protection horizon" in report and "| early | 50% | 25% | - | - |" in report
    # heads trained under a class-dependent pattern: against modality dropout trained under the same pattern,
    # the oracle trained complete (none under that pattern)
    by_class = MissingPattern(kind="by_class", modality="image", class_rates={"a": 0.9, "b": 0.1}).key
    under = [run("moddrop", [0.9, 0.88, 0.86, 0.84, 0.82]), run("early", [0.93, 0.87, 0.84, 0.83, 0.83])]
    for r in under:
        r.train_pattern = by_class
    horizon = protection_horizon(runs + under, "acc")
    assert horizon[f"early @ {by_class}"]["moddrop_image"] == 0.25  # 0.87 < 0.88 (complete moddrop: 0.85)
    assert horizon[f"early @ {by_class}"]["oracle_image"] is None  # never below the complete oracle's 0.8
    assert horizon[f"moddrop @ {by_class}"]["moddrop_image"] is None
    assert horizon["early"]["moddrop_image"] == 0.25 and horizon["early"]["oracle_image"] == 0.5  # unchanged
    report = write_report(runs + under, tmp_path / "under", "horizon").read_text()
    escaped = by_class.replace("|", "\\|")  # the pattern's own "|" would split a Markdown cell
    assert f"| early @ {escaped} | - | 25% | - | - |" in report and f"| early | {escaped} |" in report


def test_missingness_driven_by_a_manifest_column_the_store_keeps(tmp_path):
    """``data.attributes`` keeps a manifest column with each row of the dataset table; a ``by_column`` pattern
    draws on it through the store (the pinned version), a column the manifest lacks is one line, a pattern on
    a column the config does not keep is refused at load, and a store made before the column existed gets it."""
    import json
    import lancedb
    from conftest import make_manifest, manifest_config
    from models.config import ExperimentConfig
    from stores.datasets import DatasetError
    from stores.extraction import extract
    from stores.features.feature_store import FeatureStore, StoreError
    from stores.features.scenarios import ScenarioReader
    path = make_manifest(tmp_path / "raw", n=60, bad=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 6:  # every sixth row has no site
            r["site"] = ["north", "south"][i % 2]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = manifest_config(tmp_path, path)
    report = extract(cfg, progress=False)  # no attributes kept yet: a store as older versions wrote it
    store = FeatureStore(cfg.store.root, report.store)
    lancedb.connect(cfg.store.root).open_table(store.dataset).drop_columns(["attrs"])
    pattern = {"kind": "by_column", "modality": "image", "column": "site", "column_rates": {"north": 1.0, "south": 0.0},
               "rate": 0.5}
    with pytest.raises(ValueError, match="does not keep"):
        manifest_config(tmp_path, path, train_pattern=pattern)
    with pytest.raises(StoreError, match="keeps no column 'site'"):
        ScenarioReader(FeatureStore(cfg.store.root, report.store), ("vec",), 0).under("train", MissingPattern(**pattern))
    with pytest.raises(DatasetError, match="has no column 'sight'"):
        extract(manifest_config(tmp_path, path, data__attributes=["sight"]), progress=False)
    kept = manifest_config(tmp_path, path, data__attributes=["site"], train_pattern=pattern)
    assert isinstance(kept, ExperimentConfig)
    again = extract(kept, progress=False)
    assert again.encoded == {"image": 0, "text": 0}  # the column is data about the rows: nothing re-encoded
    reader = ScenarioReader(FeatureStore(cfg.store.root, again.store), ("vec",), 0)
    ids = reader.split("train").ids
    site = dict(zip([r["id"] for r in rows], [r.get("site") for r in rows]))
    present = reader.under("train", kept.train_pattern).present.numpy()
    groups = np.array([site[i] for i in ids], dtype=object)
    assert not present[groups == "north", 0].any() and present[groups == "south", 0].all()
    assert (~present[groups == None, 0]).sum() == round(0.5 * (groups == None).sum())  # noqa: E711
    assert present[:, 1].all()


def test_the_mask_table_is_compacted_at_the_configured_fragment_count(colour_store):
    """One commit per (split, pattern, seed): past ``store.max_fragments`` fragments the table is compacted."""
    from stores.features.feature_store import FeatureStore
    from stores.features.masks import MaskStore
    cfg, report = colour_store
    store = FeatureStore(cfg.store.root, report.store, max_fragments=2)
    masks, ids = MaskStore(store), [f"x{i}" for i in range(10)]
    for rate in (0.1, 0.2, 0.3, 0.4, 0.5):  # five new mask sets
        masks.get("train", ids, MissingPattern(kind="per_modality", rates={"image": rate}), seed=7)
        assert masks._table().stats()["fragment_stats"]["num_fragments"] <= 2
    assert len(masks.table(seed=7)) == 50
