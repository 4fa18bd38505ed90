"""What a user sees: the Makefile's environment, bad values refused at load time with one line, tables without
"± 0.0" for one seed, and a train cache key that follows the code."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TOKENIZERS_PARALLELISM": "false"}


def test_make_exports_every_variable_with_its_value():
    """Recipes (`make test`, `make demo`) run with each variable exported on its own, from a clean env."""
    out = subprocess.run(["make", "-s", "env"], cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines())
    assert got == MAKE_ENV


@pytest.mark.parametrize("override, field", [("train.epochs=-1", "train.epochs"),
                                             ("eval.test_rates=[1.5]", "eval.test_rates"),
                                             ("train.lr=0", "train.lr")])
def test_bad_value_exits_2_with_one_line_and_nothing_tracked(override, field, tmp_path, capsys):
    from flows.cli import main
    tracking = tmp_path / "mlruns"
    with pytest.raises(SystemExit) as e:
        main(["train", "--set", "data.dataset=fashion", "--set", override, "--set", f"store.root={tmp_path}/store",
              "--set", f"tracking.uri=sqlite:///{tracking}/mlflow.db", "--set", f"tracking.artifact_root={tracking}"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and field in err and "Traceback" not in err
    assert not tracking.exists() and not (tmp_path / "store").exists()  # no MLflow run, no model version


def test_every_numeric_field_with_a_range_is_checked():
    from models.config import ConfigError
    from stores.config_files import load_config
    for bad in ["train.batch_size=0", "train.patience=0", "train.warmup_frac=1.5", "sweep.max_parallel=0",
                "store.write_every=0", "store.index_kmeans_iterations=0", "store.lock_timeout_s=-1",
                "tracking.connect_timeout_s=0", "data.limit=0",
                "encoders.image.batch_size=0", "data.val_fraction=1", "sweep.seeds=[-1]", "eval.test_rates=[]"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, ["data.dataset=fashion", bad])


def _result(variant, seed, acc):
    from models.records import RunRow
    return RunRow(variant, "complete", seed, {"image-000/text-000": {"acc": acc}}, {"grid_mean_acc": acc - 0.1})


def test_single_seed_cells_have_no_spread_and_tables_have_the_grid_mean():
    from runs.reporting import aggregate, json_rows, markdown_table
    scenarios, rows = aggregate([_result("early", 0, 0.9), _result("mmp", 0, 0.8), _result("mmp", 1, 0.6)], "acc")
    table = markdown_table(scenarios, rows)
    early, mmp = table.splitlines()[2:]
    assert "±" not in early and "| 90.0 | 80.0 | 1 |" in early
    assert "| 70.0 ± 14.1 | 60.0 ± 14.1 | 2 |" in mmp
    assert json_rows(scenarios, rows)[0]["grid_mean"] == {"mean": pytest.approx(0.8), "sd": None, "n": 1}


def test_train_cache_key_follows_the_code_that_decides_a_result(colour_store, tmp_path, monkeypatch):
    """A fix in a head must not be answered from the cache of the old code; a comment, a docstring or a change in
    code that decides no result (the YAML loader) keeps the cache."""
    import tasks.common as common
    cfg, _ = colour_store
    for part in common.DECIDING_CODE + ("stores/config_files.py",):
        src = common.CODE_ROOT / part
        dst = tmp_path / part
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    monkeypatch.setattr(common, "CODE_ROOT", tmp_path)
    before = common.content_key(cfg, "train")
    assert common.content_key(cfg, "train") == before

    def edit(part: str, new: str) -> str:
        common.code_version.cache_clear()
        (tmp_path / part).write_text(new)
        return common.content_key(cfg, "train")

    head = (tmp_path / "models/heads/fusion.py").read_text()
    assert edit("models/heads/fusion.py", head + "\n# a comment\n") == before
    assert edit("models/heads/fusion.py", head.replace('"""', '"""A reworded docstring. ', 1)) == before
    loader = (tmp_path / "stores/config_files.py").read_text()
    assert edit("stores/config_files.py", loader + "\nLOADER_CHANGE = 1\n") == before
    assert edit("models/heads/fusion.py", head + "\nA_BUG_FIX = 1\n") != before


def test_progress_display_shows_each_run_from_its_progress_file(capsys):
    """Training tasks in worker processes report through files; the console turns them into one bar per run."""
    import os
    import time
    from flows.console import training_progress
    from stores import progress
    with training_progress(poll_s=0.05):
        folder = os.environ[progress.ENV]
        progress.report("mmp complete s0", started=time.time(), state="training", epoch=3, epochs=5, val=0.8123)
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert "mmp complete s0" in err and "3/5" in err and "val 0.812" in err and "training" in err
    assert not os.path.exists(folder) and progress.ENV not in os.environ


def test_store_error_is_one_line_without_traceback(tmp_path):
    """Through the real CLI process (Prefect flow and task included): the reason, not Prefect's traceback."""
    import os
    import sys
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_LOGGING_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--set", "data.dataset=fashion",
                           "--set", f"store.root={tmp_path}/nothing", "--set",
                           f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no feature store") and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns").exists()  # no MLflow run opened


def test_result_tables_print_bracketed_head_variants_whole(capsys):
    from flows.console import key_values, note, records
    variant = "moddrop[backbone:encoder+lora,streams:text]"  # rich markup would read [...] as a style tag
    key_values({"variant": variant}, title="run")
    records([{"variant": "cmpt[text:encoder+lora]"}])
    note("source: Puma [bold] Shoes")
    out = capsys.readouterr().out
    assert variant in out and "cmpt[text:encoder+lora]" in out and "Puma [bold] Shoes" in out


def test_report_figures_leave_matplotlibs_process_state_alone(tmp_path):
    """The report's figure is drawn with matplotlib's object API (as the run's are, ``Tracker._artifacts``): no
    pyplot, so no process-wide backend switch or figure registry (a caller's plots and concurrent training
    threads are left alone)."""
    import sys
    script = f"""
import sys
from models.records import RunRow
from runs.reporting import write_report
rows = [RunRow(v, "complete", 0, {{"image-000/text-000": {{"acc": a}}, "image-100/text-000": {{"acc": a - 0.2}}}},
               {{"grid_mean_acc": a - 0.1}}) for v, a in (("early", 0.9), ("mmp", 0.8))]
report = write_report(rows, __import__("pathlib").Path({str(tmp_path)!r}), "t")
assert (report.parent / "robustness.png").stat().st_size > 1000
print("pyplot" if "matplotlib.pyplot" in sys.modules else "no-pyplot")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["no-pyplot"]  # (matplotlib.get_backend() would itself import pyplot)
