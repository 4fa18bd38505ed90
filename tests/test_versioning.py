"""DVC: data.dvc tracks the store; push to a local remote, wipe, pull back identical."""
import hashlib
import shutil
import subprocess
from pathlib import Path

from stores.features import versioning


def digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_push_pull_round_trip(git_repo, colour_store):
    cfg, report = colour_store
    data = git_repo / "data"
    shutil.copytree(cfg.store.root, data / "store", ignore=shutil.ignore_patterns("*.lock"))
    before = digest(data)
    versioning.ensure_repo(git_repo, Path("dvc-remote"))  # relative to the repo, as in the default config
    md5 = versioning.track(git_repo, "data")
    assert md5 and md5.endswith(".dir") and versioning.data_hash(git_repo) == md5
    assert "/data" in (git_repo / ".gitignore").read_text()
    versioning.push(git_repo)
    assert (git_repo / "dvc-remote" / "files").is_dir()  # landed inside the repo's remote folder
    subprocess.run(["git", "add", "data.dvc", ".gitignore", ".dvc"], cwd=git_repo, check=True)
    shutil.rmtree(data)
    shutil.rmtree(git_repo / ".dvc" / "cache")
    versioning.pull(git_repo)
    assert digest(data) == before
    # the pulled store opens and reads
    from stores.features.feature_store import FeatureStore
    store = FeatureStore(data / "store", report.store)
    assert store.table.count_rows() == 36


def test_dvc_failure_is_reported(tmp_path):
    import pytest
    with pytest.raises(versioning.DvcError, match="dvc pull"):
        versioning.dvc(tmp_path, "pull", "nothing.dvc")
