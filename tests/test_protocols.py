"""``mm protocol <preset>`` (issue 22): the papers' protocols as named, versioned presets that run end to end on any
dataset, with the papers' published rows and our differences beside the table on the paper's dataset."""
import json
import os
import re
from pathlib import Path

import pytest

from models.patterns import scenario_slug
from models.protocol_presets import MMP_TABLE3_V1, PRESETS, SRMM_TABLE6_V1
from runs.protocols import available, get_preset, map_pattern, preset_report, preset_runs
from stores.config_files import load_config

# a preset never changes: an edit to one needs a new version (a new entry here), never a new hash for an old id
RECORDED = {
    "map-v1": "8da6bb6a8359ae4dc9fa139b1a5c034358b16f88ea96801a1f9576f845b089e4",
    "srmm-table6-v1": "28b9ef8cd13055a944c671de47453168662f93e20efad1a35577a16862492895",
    "mmp-table3-v1": "2ba9d5cca40070820b7c6add6a161c58a6d5c497d8bff34ee033eaa0bcf45aae",
    "cmpt-table2-v1": "822adb3226459c3bcb420e96a5f1d8eb9763ef709d0170e69e13d6c86707778c",
}
PAPERS = Path(os.environ.get("MM_PAPERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "papers"))


def test_presets_are_versioned_and_unchanged():
    assert {k: p.content_hash() for k, p in PRESETS.items()} == RECORDED, \
        "a preset changed: give it a new version (a new Preset and a new RECORDED entry) instead of editing it"
    for key, p in PRESETS.items():
        assert key == f"{p.name}-v{p.version}" and p.source and p.notes and p.seeds
        assert all(re.match(r"00[014] Table [0-9IVX]+", pub.source) for pub in p.published)


def test_published_numbers_are_the_papers_own():
    """Every encoded value appears in its paper's text (001/000 print two decimals, 004 one)."""
    if not PAPERS.exists():
        pytest.skip(f"papers not found at {PAPERS}")
    text = {n: next(PAPERS.glob(f"{n}_*.txt")).read_text() for n in ("000", "001", "004")}
    missing = [(p.id, pub.method, pub.source, col, v) for p in PRESETS.values() for pub in p.published
               for col, v in pub.values
               if (f"{v:.1f}" if pub.source.startswith("004") else f"{v:.2f}") not in text[pub.source[:3]]]
    assert not missing


def test_a_preset_fixes_eta_selection_epochs_seeds_and_the_placeholder(tmp_path):
    base = load_config(None, [f"tune.out_dir={tmp_path}"])
    mods = list(base.encoder_configs())
    runs = preset_runs(get_preset("map-v1"), base, mods, [], heads=["moddrop", "srmm"], paper_rows=False)
    assert len(runs) == 2 * 3 * 3  # heads x MAP types x seeds
    cfgs = [c for _, c in runs]
    assert {c.train_pattern.key for c in cfgs} == {map_pattern(t).key for t in [*mods, "both"]}
    assert {c.seed for c in cfgs} == {0, 1, 2} and all(c.train_pattern.eta == 0.7 for c in cfgs)
    assert all(c.train.epochs == 10 and c.train.patience == 10 for c in cfgs)  # 001 A3: fixed 10 epochs
    assert all(c.eval.select_on == "train_pattern" and c.eval.paper_protocol for c in cfgs)  # 001 A4
    assert {c.head.fill for c in cfgs if c.head.name == "moddrop"} == {"placeholder"}
    assert len({k for k, _ in runs}) == len(runs)
    one = preset_runs(get_preset("srmm-table6-v1"), base, mods, [], heads=["srmm"], seeds=[3], epochs=2)
    assert [(c.head.name, c.seed, c.train.epochs, c.train_pattern.kind) for _, c in one] == \
        [("srmm", 3, 2, "complete"), ("srmm", 3, 2, "complete")]  # its default and its paper-constants row


def _rows(head: dict, variant: str, scenarios: dict[str, float]) -> list[dict]:
    return [{"variant": variant, "train_pattern": "complete", "seed": s, "summary": {},
             "scenarios": {k: {"acc": v + s / 1000} for k, v in scenarios.items()},
             "key": json.dumps([head, "complete", s, None, False, "paper"])} for s in (0, 1)]


def test_the_papers_rows_and_the_difference_stand_beside_the_table_on_the_papers_dataset():
    mods = ["image", "text"]
    slugs = {f"({round(a * 100)},{round(b * 100)})": scenario_slug(available({"image": a, "text": b}), mods)
             for a, b in [(1.0, 1.0), (1.0, 0.3), (1.0, 0.0), (0.65, 0.65), (0.3, 1.0), (0.0, 1.0)]}
    results = _rows({"name": "mmp"}, "mmp[tokens:x]", {s: 0.9 for s in slugs.values()}) + \
        _rows({"name": "early"}, "early", {s: 0.5 for s in slugs.values()})
    rep = preset_report(MMP_TABLE3_V1, results, mods, "food101")
    table = rep["sections"][0]["table"]
    assert rep["published_apply"] and "000 Table III" in rep["note"]
    assert "| published: MMP (000 Table III) | complete | 92.87 | 74.32 | 66.06 | 80.28 | 87.71 | 85.37 |  |" in table
    # ours (90.05 = mean of 90.0 and 90.1) minus MMP's 92.87 at (100,100): -2.8
    assert "| ours - published: mmp[tokens:x] - MMP | complete | -2.8 | +15.7 |" in table
    assert "ours - published: early" not in table  # ViLT and the prompts are not held against a head of ours
    record = next(r for r in rep["sections"][0]["published"] if r["method"] == "MMP")
    assert record["vs"]["mmp[tokens:x]"]["(100,0)"] == pytest.approx(90.05 - 66.06)
    elsewhere = preset_report(MMP_TABLE3_V1, results, mods, "manifest")
    assert not elsewhere["published_apply"] and "published" not in elsewhere["sections"][0]["table"]
    assert elsewhere["note"].startswith("no published rows apply: data.dataset is 'manifest'")


def test_table_2_rows_sit_in_protocol_d_columns_of_a_whole_modality_missing():
    """001 Table 2 (trained complete, one modality missing in every test sample) is protocol d's (100,100),
    (100,0) and (0,100) columns; the other pairs stay blank in the published rows."""
    mods = ["image", "text"]
    slugs = [scenario_slug(available({"image": a, "text": b}), mods)
             for a, b in [(1.0, 1.0), (1.0, 0.3), (1.0, 0.0), (0.65, 0.65), (0.3, 1.0), (0.0, 1.0)]]
    results = _rows({"name": "cmpt"}, "cmpt[tokens:x]", {s: 0.9 for s in slugs})
    table = preset_report(PRESETS["cmpt-table2-v1"], results, mods, "food101")["sections"][0]["table"]
    assert "| published: CMPT (001 Table 2) | complete | 94.47 |  | 75.66 |  |  | 80.66 |  |" in table
    assert "| ours - published: cmpt[tokens:x] - CMPT | complete | -4.4 |  | +14.4 |  |  | +9.4 |  |" in table
    assert "| published: MLA (001 Table 2) | complete | 93.33 |  | 69.6 |" in table  # held against no head of ours


def test_table_vi_and_x_rows_join_protocol_c_with_the_oracles():
    mods = ["image", "text"]
    slugs = [scenario_slug(available({"text": a}), mods) for a in (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0)]
    results = _rows({"name": "oracle", "modality": "text"}, "oracle[only:text]", {s: 0.8 for s in slugs})
    table = preset_report(SRMM_TABLE6_V1, results, mods, "food101")["sections"][0]["table"]
    assert "| published: CLIP text only (004 Table X) | complete | 86.2 |" in table
    assert "| ours - published: oracle[only:text] - CLIP text only | complete | -6.2 |" in table


@pytest.fixture()
def protocol_cli(colour_store, prefect_harness, mlflow_db, tmp_path, capsys, monkeypatch):
    """``mm protocol`` on the colour store: one seed, one epoch, its own MLflow store, JSON out."""
    import yaml
    from flows.cli import main
    cfg = colour_store[0].model_copy(deep=True)
    cfg.tracking.uri, cfg.tracking.artifact_root = mlflow_db(tmp_path / "mlflow.db"), str(tmp_path / "art")
    cfg.sweep.max_parallel = 1
    path = tmp_path / "colours.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)  # the sweep report lands in the scratch folder

    def run(preset: str, *extra: str, as_json: bool = True) -> dict | str:
        capsys.readouterr()
        main(["protocol", preset, "-c", str(path), "--seeds", "0", "--epochs", "1", *extra]
             + (["--json"] if as_json else []))
        printed = capsys.readouterr().out
        return json.loads(printed) if as_json else printed
    return run


@pytest.mark.parametrize("preset, heads, n_runs", [("map-v1", ["early"], 3), ("srmm-table6-v1", ["early", "srmm"], 2)])
def test_every_preset_runs_end_to_end_on_a_tiny_dataset(protocol_cli, preset, heads, n_runs):
    res = protocol_cli(preset, "--heads", *heads, "--no-paper-rows")
    assert res["preset"] == preset and len(res["runs"]) == n_runs
    assert [s["protocol"] for s in res["sections"]] == list(PRESETS[preset].protocols)
    for s in res["sections"]:
        body = s["table"].splitlines()[2:]
        assert body and all(line.startswith("| ") for line in body) and not s["published"]
        assert {line.split(" | ")[0].lstrip("| ").split("[")[0] for line in body} == set(heads)
    assert not res["published_apply"] and res["note"].startswith("no published rows apply")
    assert all(r["summary"] for r in res["runs"]) and Path(res["report"]).exists()


def test_the_third_preset_prints_its_table_for_people(protocol_cli):
    text = protocol_cli("mmp-table3-v1", "--heads", "early", as_json=False)
    assert "mmp-table3-v1: 000 §IV-E Table III" in text and "### d) 000 Table III" in text
    assert "| head | train | (100,100) | (100,30) |" in text and "| early" in text
    assert "no published rows apply: data.dataset is 'manifest'" in text
