"""The registered model serves where this repository is not importable: `mlflow models serve` from a folder
outside the repo, in an environment that has the project's third-party packages but not the project."""
from __future__ import annotations

import base64
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import served_model


@pytest.fixture(scope="module")
def colours_model(colour_store, prefect_harness, tmp_path_factory):
    """A tiny `early` head trained by the real train flow on the colour store, named by ``data.name``."""
    from flows.pipeline import train_flow
    from models.heads import parse_head_config
    from stores.extraction import extract

    cfg, _ = colour_store
    tmp = tmp_path_factory.mktemp("colours")
    cfg = cfg.model_copy(deep=True, update={"head": parse_head_config({"name": "early"})})
    cfg.data.name = "colours"
    cfg.store.root = tmp / "store"
    cfg.tracking.uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    cfg.tracking.artifact_root = str(tmp / "mlruns" / "art")
    cfg.train.epochs = 3
    cfg.train.patience = 5
    extract(cfg, progress=False)
    return cfg, train_flow(cfg)


def test_registered_names_use_the_dataset_name(colours_model):
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_experiment_by_name("colours") is not None and client.get_experiment_by_name("manifest") is None
    [version] = client.search_model_versions("name = 'colours-early'")
    assert version.run_id == out.run_id
    assert not client.search_model_versions("name = 'manifest-early'")


def test_mm_train_sets_the_dataset_champion_when_there_is_none(colours_model):
    """``models:/<data.name>@champion`` (the best model of any head) exists after a single ``mm train``, so the
    README's serve command works after any run; the run records the process that owned it."""
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    champ = client.get_model_version_by_alias("colours", "champion")
    assert champ.run_id == out.run_id
    tags = client.get_run(out.run_id).data.tags
    assert tags["pid"].isdigit() and tags["host"] and tags["pid_started"]


def test_run_is_open_while_training_with_live_epochs(colours_model):
    """The run starts before the first epoch is logged, lasts at least the fit, and has one point per epoch."""
    from mlflow.tracking import MlflowClient
    cfg, out = colours_model
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out.run_id)
    loss = client.get_metric_history(out.run_id, "train/train_loss")
    assert sorted(m.step for m in loss) == list(range(len(loss))) and len(loss) >= 1
    assert run.info.start_time < min(m.timestamp for m in loss)
    fit_s = run.data.metrics["fit/seconds"]
    assert (run.info.end_time - run.info.start_time) / 1000 >= fit_s
    assert max(m.timestamp for m in loss) <= run.info.end_time
    # each epoch's wall time (its validation included), a point per epoch, together the fit's time
    seconds = client.get_metric_history(out.run_id, "train/seconds")
    assert sorted(m.step for m in seconds) == sorted(m.step for m in loss) and all(m.value > 0 for m in seconds)
    assert sum(m.value for m in seconds) <= fit_s


def test_registered_model_serves_outside_the_repo(colours_model, tmp_path):
    cfg, out = colours_model
    with served_model("models:/colours-early/1", cfg.tracking.uri, tmp_path) as (invoke, python, env, work):
        probe = subprocess.run([str(python), "-c", "import stores"], cwd=work, env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "No module named 'stores'" in probe.stderr
        assert subprocess.run([str(python), "-c", "import mlflow, torch, lancedb"], cwd=work, env=env).returncode == 0
        [pred] = invoke([{"image": None, "text": "deep blue ocean"}])
        assert pred["label"] in ["class0", "class1", "class2"] and 0 < pred["prob"] <= 1
        # inline image bytes are read; a server-side path is not (no MM_SERVE_ROOTS); nothing usable abstains
        image = Path(cfg.data.manifest).parent / "img6.jpg"
        inline = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
        sent, probe, empty = invoke([{"image": inline, "text": None}, {"image": "/etc/passwd", "text": None},
                                     {"image": None, "text": None}])
        assert sent["present"] == ["image"] and sent["abstain"] is False
        assert probe["abstain"] is True and "server-side paths are not read here" in probe["reason"]
        assert empty["abstain"] is True and not isinstance(empty["label"], str)  # null (pandas may write NaN)
        # concurrent requests are answered in micro-batches: each gets its own answers, as when sent alone
        requests = [[{"image": None, "text": t}] for t in ("deep blue ocean", "red fire", "green grass")] * 4
        requests += [[{"image": inline, "text": "red fire"}, {"image": None, "text": "green grass"}]] * 2
        alone = [invoke(r) for r in requests[:3] + requests[-1:]]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(invoke, requests))
        assert together == alone[:3] * 4 + alone[-1:] * 2


def test_compare_of_one_seed_shows_no_spread(colours_model, capsys):
    from flows.cli import main
    cfg, _ = colours_model
    args = ["--set", "data.dataset=manifest", "--set", "data.name=colours", "--set", f"tracking.uri={cfg.tracking.uri}"]
    main(["compare", *args])
    human = capsys.readouterr().out
    assert "early" in human and "grid mean" in human and "±" not in human
    main(["compare", "--json", *args])
    res = json.loads(capsys.readouterr().out)
    assert res["experiment"] == "colours" and res["table"][0]["seeds"] == 1
    assert res["table"][0]["grid_mean"]["sd"] is None


def test_micro_batcher_batches_concurrent_requests_and_keeps_errors_apart():
    """Requests that arrive while a batch runs form the next batch, each caller gets its own answers in order,
    and a failing request fails alone."""
    import threading
    import time

    from stores.tracking.batching import MicroBatcher
    calls: list[list[str]] = []
    first = threading.Event()

    def fn(samples):
        calls.append([s["x"] for s in samples])
        if any(s["x"] == "bad" for s in samples):
            raise ValueError("bad sample")
        if len(calls) == 1:
            first.wait(5)  # hold the first batch until the others are queued
        return [s["x"].upper() for s in samples]

    batcher = MicroBatcher(fn, max_batch=32)
    with ThreadPoolExecutor(9) as pool:
        lead = pool.submit(batcher.submit, [{"x": "lead"}])
        while not calls:
            time.sleep(0.01)
        rest = [pool.submit(batcher.submit, [{"x": f"r{i}"}, {"x": f"s{i}"}]) for i in range(7)]
        bad = pool.submit(batcher.submit, [{"x": "bad"}])
        while batcher.pending.qsize() < 8:
            time.sleep(0.01)
        first.set()
        assert lead.result(10) == ["LEAD"]
        assert [f.result(10) for f in rest] == [[f"R{i}", f"S{i}"] for i in range(7)]
        with pytest.raises(ValueError, match="bad sample"):
            bad.result(10)
    # one batch for the lead, one for the eight queued requests (which failed), then each of those alone
    assert calls[0] == ["lead"] and len(calls[1]) == 15 and len(calls) == 2 + 8
    assert MicroBatcher(fn).submit([]) == []
    # idle, the worker thread ends (nothing keeps a loaded model alive); the next request starts another
    quick = MicroBatcher(fn, idle_s=0.05)
    assert quick.submit([{"x": "a"}]) == ["A"]
    worker = quick.worker
    worker.join(5)
    assert not worker.is_alive() and quick.worker is None
    assert quick.submit([{"x": "b"}]) == ["B"]


def test_micro_batcher_waits_for_the_callers_it_just_answered_but_not_for_a_lone_one():
    """A batch smaller than the last one waits (up to ``max_wait_s``) for more: the callers just answered send
    again, and without the wait six clients alternated batches of five and one. A lone caller pays that wait at
    most once: after a batch of one, the next runs at once."""
    import threading
    import time

    from stores.tracking.batching import MicroBatcher
    calls: list[list[str]] = []
    hold = threading.Event()

    def fn(samples):
        calls.append([s["x"] for s in samples])
        if len(calls) == 1:
            hold.wait(5)
        return [s["x"] for s in samples]

    def seen(batch: list[str], within: float = 5.0) -> float:
        t0 = time.monotonic()
        while batch not in calls and time.monotonic() - t0 < within:
            time.sleep(0.005)
        return time.monotonic() - t0

    batcher = MicroBatcher(fn, max_wait_s=3.0)
    with ThreadPoolExecutor(4) as pool:
        pool.submit(batcher.submit, [{"x": "lead"}])
        seen(["lead"])
        three = [pool.submit(batcher.submit, [{"x": f"r{i}"}]) for i in range(3)]
        while batcher.pending.qsize() < 3:
            time.sleep(0.005)
        hold.set()
        assert [f.result(10) for f in three] == [["r0"], ["r1"], ["r2"]]
        assert calls[1] == ["r0", "r1", "r2"]  # the last batch held three samples
        a = pool.submit(batcher.submit, [{"x": "a"}])
        time.sleep(0.2)  # "a" is taken and waits for the next two (the old batcher ran it alone here)
        rest = [pool.submit(batcher.submit, [{"x": x}]) for x in ("b", "c")]
        assert a.result(10) == ["a"] and [f.result(10) for f in rest] == [["b"], ["c"]]
        assert calls[2] == ["a", "b", "c"]
        # a lone caller: waits out the window once (the batch before held three), then runs at once
        lone = pool.submit(batcher.submit, [{"x": "d"}])
        assert seen(["d"]) > 2.5 and lone.result(10) == ["d"]
        again = pool.submit(batcher.submit, [{"x": "e"}])
        assert seen(["e"]) < 2.5 and again.result(10) == ["e"]
