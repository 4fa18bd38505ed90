"""Comparing runs in the MLflow UI (issue: it opens on the runs, names tell runs apart, the comparison is one
click away): the experiment kind tag read through MLflow's REST API, run names unique within a sweep that has
both oracles, the short comparison metrics, and the sweep's parent run holding the table `mm compare` prints."""
import os
import subprocess
import sys

import httpx
import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, wait_http
from stores.config_files import load_config

HEADS = [{"name": "early"}, {"name": "moddrop"}, {"name": "oracle", "modality": "image"},
         {"name": "oracle", "modality": "text"}, {"name": "mmp", "mask_p": 0.4}]


@pytest.fixture(scope="module")
def ui_sweep(colour_store, prefect_harness, mlflow_db, tmp_path_factory):
    from flows.pipeline import run_sweep
    tmp = tmp_path_factory.mktemp("ui")
    cfg = colour_store[0].model_copy(deep=True)
    cfg.tracking.uri, cfg.tracking.artifact_root = mlflow_db(tmp / "mlflow.db"), str(tmp / "art")
    cfg.sweep.heads, cfg.sweep.seeds, cfg.train.epochs = HEADS, [0], 2
    # an experiment created before the kind tag existed (by MLflow itself here) gets it from the next run
    MlflowClient(cfg.tracking.uri).create_experiment(cfg.data.dataset_name, artifact_location=str(tmp / "art"))
    cwd = os.getcwd()
    os.chdir(tmp)  # the report folder lands in the scratch folder
    try:
        swept = run_sweep(cfg)
    finally:
        os.chdir(cwd)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.data.dataset_name)
    runs = client.search_runs([exp.experiment_id])
    return cfg, swept, client, runs


def test_experiment_is_tagged_as_model_training_in_the_rest_api(ui_sweep, tmp_path):
    cfg, *_ = ui_sweep
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", cfg.tracking.uri, "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", 90, server)
        r = httpx.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name",
                      params={"experiment_name": cfg.data.dataset_name}, timeout=30)
        tags = {t["key"]: t["value"] for t in r.json()["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        # 3.17's UI reads its GenAI/training switch from the browser unless the URL sets it: `mm serve` prints this
        from stores.tracking.runs import runs_page
        exp_id = r.json()["experiment"]["experiment_id"]
        assert runs_page(cfg.tracking, cfg.data.dataset_name, f"http://127.0.0.1:{port}") == \
            f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    finally:
        server.terminate()
        server.wait(30)


def test_run_names_tell_every_run_of_a_sweep_apart(ui_sweep):
    _, swept, _, runs = ui_sweep
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == swept.run_id]
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(["early-complete-s0", "moddrop-complete-s0", "oracle-image-complete-s0",
                            "oracle-text-complete-s0", "mmp+mask_p=0.4-complete-s0"])


def test_every_run_carries_its_deviations_from_the_papers_as_a_tag(ui_sweep):
    _, swept, _, runs = ui_sweep
    tags = {r.info.run_name: r.data.tags for r in runs if r.data.tags.get("mlflow.parentRunId") == swept.run_id}
    mmp = tags["mmp+mask_p=0.4-complete-s0"]
    assert mmp["deviation"].split("+")[:2] == ["mask_p=0.4", "mask_per=sample"]  # 000 §III-A: 0.5, per iteration
    assert "deviation:" + mmp["deviation"] in mmp["head_variant"]
    assert tags["early-complete-s0"]["deviation"] == "none"  # no paper states a baseline's values


def test_run_names_show_a_lora_backbone_a_pattern_and_a_tuned_file():
    from pathlib import Path
    from stores.tracking.runs import run_name
    cfg = load_config(None, ["head.name=moddrop", "head.backbone=encoder+lora", "seed=2",
                             "train_pattern.kind=per_modality", "train_pattern.rates.image=0.5"])
    assert run_name(cfg) == "moddrop-lora-per_modality[image=50]-s2"
    tuned = load_config(Path(__file__).resolve().parents[1] / "configs" / "tuned" / "fashion-mmp.yaml")
    assert run_name(tuned) == "mmp-complete-s0-tuned"  # its many tuned head fields are what "tuned" stands for
    long = load_config(None, ["head.name=mmp", "head.mask_p=0.4", "head.align_weight=2.0", "head.d_model=64",
                              "head.dropout=0.2"])
    assert run_name(long).startswith("mmp+") and len(run_name(long)) < 40
    assert run_name(long) != run_name(load_config(None, ["head.name=mmp", "head.mask_p=0.4", "head.d_model=64",
                                                         "head.align_weight=2.5", "head.dropout=0.2"]))


def test_comparison_metrics_lead_the_chart_view_under_short_names(ui_sweep):
    """MLflow's chart view sorts metric groups by name (ungrouped metrics last): ``compare/`` comes first."""
    _, swept, _, runs = ui_sweep
    by_name = {r.info.run_name: r.data.metrics for r in runs}
    for name in ("early-complete-s0", "mmp+mask_p=0.4-complete-s0"):
        m = by_name[name]
        assert {k for k in m if k.startswith("compare/")} >= {
            "compare/complete_acc", "compare/grid_mean_acc", "compare/no_image_acc", "compare/no_text_acc",
            "compare/ece"}
        assert sorted({k.rsplit("/", 1)[0] for k in m})[0] == "compare"
        assert m["compare/complete_acc"] == m["summary/complete_acc"]
        assert m["compare/grid_mean_acc"] == m["summary/grid_mean_acc"]
        assert m["compare/no_image_acc"] == m["test/acc/image-100/text-000"]
        assert m["compare/ece"] == m["test/ece/image-000/text-000"]


def test_gap_closed_lands_on_each_run_once_the_sweep_has_its_references():
    """The sweep's parent logs ``compare/gap_closed_<m>`` on its children: (head - early) / (oracle - early)."""
    from models.records import RunRow
    from runs.gap import gap_metrics
    s = {"image-000/text-000": {"acc": 0.9}, "image-100/text-000": None, "image-000/text-100": {"acc": 0.6}}

    def row(variant, no_image, run_id):
        return RunRow(variant, "complete", 0, {**{k: v for k, v in s.items() if v}, "image-100/text-000":
                                               {"acc": no_image}}, {}, run_id=run_id)
    rows = [row("early", 0.5, "e"), row("oracle[only:text]", 0.8, "o"), row("mmp[x]", 0.74, "m")]
    assert gap_metrics(rows, "acc") == {"m": {"compare/gap_closed_image": pytest.approx(0.8)},
                                        "e": {"compare/gap_closed_image": pytest.approx(0.0)}}


def test_sweep_parent_run_shows_the_table_mm_compare_prints(ui_sweep, tmp_path):
    from runs.reporting import compare_table, summary_table, to_markdown
    from stores.tracking.runs import run_results
    cfg, swept, client, runs = ui_sweep
    parent = client.get_run(swept.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("sweep-")
    assert parent.data.tags["kind"] == "sweep" and "oracle-image" in parent.data.params["sweep.heads"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == swept.run_id]
    assert len(children) == len(HEADS) and all(r.info.status == "FINISHED" for r in children)
    assert {a.path for a in client.list_artifacts(swept.run_id)} >= {"report.md", "report.html", "robustness.png",
                                                                    "config.yaml"}
    # the description: the comparison numbers per head, from the same runs `mm compare` reads
    summary = summary_table(run_results(cfg.tracking, cfg.data.dataset_name), "acc")
    note = parent.data.tags["mlflow.note.content"]
    assert summary in note and "| oracle-image | complete |" in summary and "no text" in summary.splitlines()[0]
    table = to_markdown(compare_table(cfg.tracking, cfg.data.dataset_name))  # what `mm compare` prints, from MLflow
    assert table in open(client.download_artifacts(swept.run_id, "report.md", str(tmp_path))).read()
    html = open(client.download_artifacts(swept.run_id, "report.html", str(tmp_path))).read()
    assert "oracle[only:text]" in html and "grid_mean" in html


def test_a_sweeps_metrics_land_on_its_children_and_a_failed_sweep_says_so(ui_sweep):
    from stores.tracking.studies import end_sweep_run, start_sweep_run
    cfg, swept, client, _ = ui_sweep
    child = swept.results[0].run_id
    parent = start_sweep_run(cfg, "sweep-failed")
    end_sweep_run(cfg.tracking, parent, None, "failed", {child: {"compare/gap_closed_image": 0.25}}, failed=True)
    assert client.get_run(child).data.metrics["compare/gap_closed_image"] == 0.25
    assert client.get_run(parent).info.status == "FAILED"
