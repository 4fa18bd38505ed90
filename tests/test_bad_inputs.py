"""Nothing a user feeds it brings it down: a bad item is a missing modality with its reason and a count (a
decompression bomb, a symlink loop, a path outside the data roots, any decoder exception), labels written several
ways are one class, and a label column mixing numbers and names is refused with one line naming rows."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import manifest_config
from models.config import DataConfig
from stores.datasets import DatasetError, load_dataset
from stores.datasets.base import Unusable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ holds the payload builders the bench sends
from bench.serving import bomb_png_bytes  # noqa: E402


def bomb_png(path, side=20000):
    """A 1-bit PNG declaring side x side pixels (bench/serving.py sends the same one to a served model)."""
    path.write_bytes(bomb_png_bytes(side))
    return path


def write_items(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def square(path, c):
    Image.fromarray(np.full((32, 32, 3), (c * 90) % 255, np.uint8)).save(path)
    return path.name


@pytest.fixture(scope="module")
def bad_items(tmp_path_factory):
    """12 good rows, then a bomb, a symlink loop, a path out of the data and an absolute path to a file outside."""
    tmp = tmp_path_factory.mktemp("bad")
    raw, outside = tmp / "raw", tmp / "elsewhere"
    raw.mkdir()
    outside.mkdir()
    rows = [{"id": f"g{i}", "split": ["train", "val", "test"][i % 3], "label": f"c{i % 2}",
             "image": square(raw / f"g{i}.png", i % 2), "text": f"colour {i % 2}"} for i in range(12)]
    bomb_png(raw / "bomb.png")
    os.symlink(raw / "loop_b.png", raw / "loop_a.png")
    os.symlink(raw / "loop_a.png", raw / "loop_b.png")
    square(outside / "far.png", 1)
    os.symlink(outside / "far.png", raw / "link_out.png")  # a symlink out of the data folder
    rows += [{"id": "bomb", "split": "train", "label": "c0", "image": "bomb.png", "text": "a bomb"},
             {"id": "loop", "split": "train", "label": "c1", "image": "loop_a.png", "text": "a loop"},
             {"id": "up", "split": "train", "label": "c0", "image": "../../../../../../etc/passwd", "text": "up"},
             {"id": "abs", "split": "train", "label": "c1", "image": str(outside / "far.png"), "text": "abs"},
             {"id": "link", "split": "train", "label": "c1", "image": "link_out.png", "text": "link"}]
    return tmp, write_items(raw, rows), outside


def test_paths_resolve_inside_the_manifest_folder_or_the_allowed_roots(bad_items):
    tmp, manifest, outside = bad_items
    ds = load_dataset(DataConfig(dataset="manifest", manifest=manifest))
    image = {r.id: r.payload["image"] for r in ds.records}
    for rid in ("up", "abs", "link"):
        assert isinstance(image[rid], Unusable) and image[rid].reason.startswith("outside the data roots")
    assert image["loop"].endswith("loop_a.png") or image["loop"].endswith("loop_b.png")  # no exception on a loop
    allowed = load_dataset(DataConfig(dataset="manifest", manifest=manifest, allowed_roots=[outside]))
    image = {r.id: r.payload["image"] for r in allowed.records}
    assert image["abs"] == image["link"] == str((outside / "far.png").resolve()) and isinstance(image["up"], Unusable)


def test_every_bad_item_is_missing_with_its_reason_and_the_run_completes(bad_items):
    from stores.extraction import extract
    from stores.features.feature_store import FeatureStore
    tmp, manifest, _ = bad_items
    cfg = manifest_config(tmp, manifest)
    report = extract(cfg, progress=False)
    assert report.rows == 17
    assert report.missing_counts["image"] == {"image too large": 1, "unreadable image": 1,
                                              "outside the data roots": 3}
    store = FeatureStore.for_config(cfg)
    t = store.table.search().select(["id", "image_present"]).limit(100).to_arrow().to_pylist()
    present = {r["id"]: r["image_present"] for r in t}
    assert not any(present[i] for i in ("bomb", "loop", "up", "abs", "link"))
    assert all(present[f"g{i}"] for i in range(12))
    again = extract(cfg, progress=False)  # nothing left to do: a bad item is not retried forever
    assert again.added == 0 and again.skipped == 17 and sum(again.encoded.values()) == 0


def test_the_pixel_limit_is_configurable(bad_items):
    from stores.encoders import build_encoder
    from stores.encoders.stream import load_or_reason
    from models.config import EncoderConfig
    tmp, manifest, _ = bad_items
    small = build_encoder("image", EncoderConfig(kind="efficientnet_lite0", max_image_pixels=1000, device="cpu"))
    x, reason = load_or_reason(small, str(manifest.parent / "g0.png"))  # 32x32 = 1024 pixels
    assert x is None and reason.startswith("image too large: 32x32 pixels, over the 1000")


def test_any_decoder_exception_is_one_items_fault():
    from stores.encoders.stream import load_or_reason

    class Flaky:
        def load(self, ref):
            raise KeyError("a decoder bug")
    assert load_or_reason(Flaky(), "x.png") == (None, "undecodable: KeyError: 'a decoder bug'")


def test_numeric_labels_written_several_ways_are_one_class(tmp_path):
    m = write_items(tmp_path, [{"id": str(i), "split": "train", "label": v, "text": "t"}
                               for i, v in enumerate([1, "1", 1.0, " 1 ", "2.0", 2, "10"])])
    ds = load_dataset(DataConfig(dataset="manifest", manifest=m))
    assert ds.classes == ["1", "10", "2"] and [r.label for r in ds.records] == [0, 0, 0, 0, 2, 2, 1]


def test_pandas_int_labels_with_a_gap_are_floats_and_still_one_class_each(tmp_path):
    df = pd.DataFrame({"id": ["a", "b", "c"], "split": ["train", "val", "test"], "label": [3, 5, 3],
                       "text": ["x", "y", "z"]})
    df["label"] = df["label"].astype(float)  # what pandas writes for an int column holding a NaN
    df.to_parquet(tmp_path / "m.parquet")
    assert load_dataset(DataConfig(dataset="manifest", manifest=tmp_path / "m.parquet")).classes == ["3", "5"]
    df.loc[1, "label"] = np.nan
    df.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(DatasetError, match=r"row 1 \(id=b\): empty label"):
        load_dataset(DataConfig(dataset="manifest", manifest=tmp_path / "m.parquet"))


def test_a_label_column_mixing_numbers_and_names_is_refused_naming_rows(tmp_path):
    labels = [1, "1", 1.0, "2.0", "cat", 2]
    m = write_items(tmp_path, [{"id": f"r{i}", "split": "train", "label": v, "text": "t"}
                               for i, v in enumerate(labels)])
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(dataset="manifest", manifest=m))
    assert "mixes numeric labels and names: 1 rows have names, e.g. rows 4 (id=r4, label 'cat')" in str(e.value)
    assert "\n" not in str(e.value)
    ds = load_dataset(DataConfig(dataset="manifest", manifest=m, classes=["1", "2", "cat"]))  # on purpose
    assert [r.label for r in ds.records] == [0, 0, 0, 1, 2, 1]


def test_a_killed_run_is_marked_killed_by_the_next_command(tmp_path, mlflow_db):
    """SIGKILL leaves a run RUNNING with no end time; the next command on that tracking store (anything that
    opens the experiment: train, sweep, compare) ends it as KILLED. A live process's run is left alone."""
    import signal
    import subprocess
    import sys
    from mlflow.tracking import MlflowClient
    from stores.config_files import load_config
    from stores.tracking.runs import Tracker, run_results
    sets = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/art"]
    code = ("import sys, time\nfrom stores.config_files import load_config\nfrom stores.tracking.runs import Tracker\n"
            "cfg = load_config(None, sys.argv[1:])\n"
            "with Tracker(cfg.tracking, 'kill').live_run(cfg) as run:\n"
            "    print(run.run_id, flush=True)\n    time.sleep(600)\n")
    mlflow_db(tmp_path / "mlflow.db")
    Tracker(load_config(None, sets).tracking, "kill")  # the experiment made once: two fresh processes would race on it
    procs, ids = [], []
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-c", code, *sets], stdout=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parents[1]))
        ids.append(procs[-1].stdout.readline().strip())
    killed, alive = ids
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(30)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(killed).info.status == "RUNNING"  # what SIGKILL leaves
    try:
        run_results(load_config(None, sets).tracking, "kill")  # e.g. `mm compare`
        run = client.get_run(killed)
        assert run.info.status == "KILLED" and run.info.end_time and "killed" in run.data.tags["killed_reason"]
        assert client.get_run(alive).info.status == "RUNNING"
        assert Tracker(load_config(None, sets).tracking, "kill").killed == []  # nothing left to mark
    finally:
        procs[1].kill()
        procs[1].wait(30)


@pytest.fixture()
def colour_cfg_file(colour_store, tmp_path):
    import yaml
    path = tmp_path / "colours.yaml"
    path.write_text(yaml.safe_dump(colour_store[0].model_dump(mode="json")))
    return path


@pytest.mark.parametrize("args, line", [
    (["--label", "0 OR 1=1"], "error: --label '0 OR 1=1' is neither a class of this store (class0, class1, class2) "
                              "nor an index 0-2"),
    (["--modality", "audio"], "error: --modality 'audio': this store holds image, text"),
    (["--image", "/no/such/picture.jpg"], "error: --image '/no/such/picture.jpg': unreadable image:"),
])
def test_bad_query_values_are_one_line_and_exit_2(colour_cfg_file, args, line, capsys):
    from flows.cli import main
    with pytest.raises(SystemExit) as e:
        main(["query", "-c", str(colour_cfg_file), *(["--id", "s006"] if "--image" not in args else []), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(line) and "\n" not in err


def test_an_unknown_split_is_refused_by_the_parser(colour_cfg_file, capsys):
    from flows.cli import main
    with pytest.raises(SystemExit) as e:
        main(["query", "-c", str(colour_cfg_file), "--id", "s006", "--split", "training"])
    assert e.value.code == 2 and "invalid choice: 'training'" in capsys.readouterr().err


def test_a_missing_encoder_path_is_one_line_and_leaves_no_store(colour_store, prefect_harness, tmp_path, capsys):
    import yaml
    from flows.cli import main
    cfg = colour_store[0].model_copy(deep=True)
    cfg.store.root = tmp_path / "store"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as e:
        main(["extract", "-c", str(tmp_path / "c.yaml"), "--set", "encoders.text.model=/nonexistent/model"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("error: encoders.text.model: /nonexistent/model does not exist")
    assert not (tmp_path / "store").exists()


def test_a_parquet_manifest_with_image_bytes_or_hf_structs_extracts_as_the_files_do(tmp_path):
    """Bytes in the image column (and Hugging Face's {bytes, path} struct) are the items themselves: they give
    the features the same files give; a column of another type is one line naming what is supported."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from stores.extraction import extract
    from stores.features.feature_store import FeatureStore
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"id": f"i{i}", "split": ["train", "val", "test"][i % 3], "label": f"c{i % 2}",
             "image": square(raw / f"i{i}.png", i % 2), "text": f"colour {i % 2}"} for i in range(9)]
    files = write_items(raw, rows)
    data = [(raw / r["image"]).read_bytes() for r in rows]
    as_bytes = pa.table({**{k: [r[k] for r in rows] for k in ("id", "split", "label", "text")}, "image": data})
    pq.write_table(as_bytes, tmp_path / "bytes.parquet")
    struct = as_bytes.set_column(4, "image", pa.array([{"bytes": d, "path": None} for d in data]))
    pq.write_table(struct, tmp_path / "struct.parquet")
    vecs = {}
    for name, manifest in (("files", files), ("bytes", tmp_path / "bytes.parquet"),
                           ("struct", tmp_path / "struct.parquet")):
        cfg = manifest_config(tmp_path / name, manifest, data__name="same")
        assert extract(cfg, progress=False).missing_counts.get("image", {}) == {}
        t = FeatureStore.for_config(cfg).table.search().select(["id", "image_vec", "source"]).limit(100).to_arrow()
        vecs[name] = dict(zip(t["id"].to_pylist(), np.asarray(t["image_vec"].to_pylist())))
        if name != "files":
            assert "bytes blake2b:" in t["source"][0].as_py()  # the source column names the bytes, not holds them
    for name in ("bytes", "struct"):
        assert all(np.allclose(vecs[name][k], vecs["files"][k], atol=1e-6) for k in vecs["files"])
    pq.write_table(as_bytes.set_column(4, "image", pa.array(list(range(9)))), tmp_path / "ints.parquet")
    with pytest.raises(DatasetError, match=r"row 0: column 'image' holds int values; supported are a path"):
        load_dataset(DataConfig(dataset="manifest", manifest=tmp_path / "ints.parquet"))


def test_a_killed_command_leaves_no_prefect_server_behind(colour_cfg_file, tmp_path):
    """SIGKILL skips Prefect's atexit hook; the temporary server must still end with the command."""
    import signal
    import subprocess
    import sys
    import time
    import psutil
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own temporary server
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "extract", "-c", str(colour_cfg_file), "--no-dvc"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, servers = time.time() + 180, []
        while time.time() < deadline and not servers and proc.poll() is None:
            servers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "prefect.server.api.server:create_app" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert servers, "the command ended before its Prefect server was seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, f"orphaned Prefect server(s): {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_damaged_data_file_is_named_by_verify_and_info_and_train_fail_in_one_line(colour_store, prefect_harness,
                                                                                   mlflow_db, tmp_path, capsys):
    import yaml
    from mlflow.tracking import MlflowClient
    from conftest import copy_tree
    from flows.cli import main
    from stores.features.feature_store import FeatureStore
    cfg = colour_store[0].model_copy(deep=True)
    cfg.store.root = copy_tree(cfg.store.root, tmp_path / "store")
    cfg.store.read_cache = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    mlflow_db(tmp_path / "mlflow.db")  # the tracking store the train below names, new and empty
    main(["store", "verify", "-c", str(tmp_path / "c.yaml")])  # healthy: exit 0
    capsys.readouterr()
    view = FeatureStore.for_config(cfg).view_names["image"]  # the image view a training reads
    victim = max((Path(cfg.store.root) / f"{view}.lance" / "data").glob("*.lance"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated data file
    with pytest.raises(SystemExit) as e:
        main(["store", "verify", "-c", str(tmp_path / "c.yaml")])
    captured = capsys.readouterr()
    assert e.value.code == 4 and "1 damaged table(s)" in captured.err and view in captured.err
    assert "rows 0-" in captured.out
    with pytest.raises(SystemExit) as e:
        main(["store", "info", "-c", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 4 and "mm store verify" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:  # not retried: one FAILED run, one line, exit 4
        main(["train", "-c", str(tmp_path / "c.yaml"), "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              "--set", f"tracking.artifact_root={tmp_path}/art"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 4 and err.startswith("error: a store file cannot be read") and "mm store verify" in err
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(["1"])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_temperatures_fitted_per_missing_pattern_lower_validation_ece(colour_store):
    """Per-pattern temperature scaling: one T for each set of present modalities, fitted on validation; the
    ECE after it is no higher than before on validation (where it is fitted), for every pattern, and the
    temperatures travel with the model to the predictor."""
    from runs.train import train_and_evaluate
    from models.calibration import fit_temperature
    import torch
    cfg = colour_store[0].model_copy(deep=True)
    cfg.train.epochs = 6
    result = train_and_evaluate(cfg)
    assert set(result.temperatures) == {"image_text", "text", "image"}
    for key in result.temperatures:
        before, after = (result.calibration[f"ece/val_{w}/{key}"] for w in ("before", "after"))
        assert after < before  # the toy colours are separable: under-confident heads get T < 1
    assert "temperature/text" in result.scalar_metrics()
    # the fit itself: over-confident logits get T > 1, and the NLL falls
    torch.manual_seed(0)
    y = torch.randint(0, 3, (400,))
    logits = torch.randn(400, 3) * 8 + torch.nn.functional.one_hot(y, 3) * 4  # sharp and often wrong
    t = fit_temperature(logits, y)
    nll = lambda s: torch.nn.functional.cross_entropy(logits / s, y).item()  # noqa: E731
    assert t > 1.5 and nll(t) < nll(1.0)


def test_a_full_disk_stops_extraction_in_one_line_with_exit_5_and_a_rerun_completes(prefect_harness, tmp_path):
    """A write the filesystem refuses (here the file size limit, EFBIG, which fails a write as a full disk's
    ENOSPC does) ends ``mm extract`` with one line and exit 5, and the same command then completes the store."""
    import resource
    import signal
    import subprocess
    import sys

    import yaml
    from prefect.settings import PREFECT_API_URL

    from conftest import make_manifest
    cfg = manifest_config(tmp_path, make_manifest(tmp_path / "raw", n=12), store__write_every=4)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # the Prefect API is the session's (its database is not under the limit); SIGXFSZ ignored: the write fails
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "flows.cli", "extract", "-c", str(path), "--no-dvc"]

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # a fragment of 4 image rows is ~115 KB

    root = Path(__file__).resolve().parents[1]
    full = subprocess.run(command, env=env, cwd=root, preexec_fn=small_files_only, capture_output=True, text=True,
                          timeout=300)
    last = full.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert full.returncode == 5, full.stderr[-2000:]
    assert last.split("error: ", 1)[1].startswith("the disk refused a write (lance error") and \
        "rerun the same command to resume" in last
    again = subprocess.run(command + ["--json"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads(again.stdout)
    assert report["rows"] == 12 and report["missing_counts"]["image"] == {"unreadable image": 2,
                                                                          "absent in source": 1}


def test_with_no_api_url_a_command_runs_on_the_local_server_when_one_answers(colour_cfg_file, prefect_harness,
                                                                             tmp_path):
    """`mm serve`'s Prefect server (here the session's, named by MM_PREFECT_LOCAL_URL) gets the runs of commands
    started without PREFECT_API_URL, instead of a temporary server that no UI shows."""
    import asyncio
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    async def extract_runs() -> int:
        async with get_client() as client:
            return sum([(await client.read_flow(r.flow_id)).name == "extract" for r in await client.read_flow_runs()])
    before = asyncio.run(extract_runs())
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(MM_PREFECT_LOCAL_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect"))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "extract", "-c", str(colour_cfg_file), "--no-dvc"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert asyncio.run(extract_runs()) == before + 1, "the extract flow ran somewhere else"
