"""DVC lineage for the feature store: ``data.dvc`` tracks ``data/``; push/pull to a remote (a local folder by
default, or an object store such as ``s3://bucket/path`` through dvc-s3)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from models.config import StoreConfig
from models.records import StoreVersion


class DvcError(RuntimeError):
    pass


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise DvcError(f"dvc {' '.join(args)} failed in {repo}:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ensure_repo(repo: Path, remote: str | Path, options: dict[str, str] | None = None) -> None:
    """``dvc init`` (inside git when there is one) and a default remote named ``storage`` at ``remote`` (a folder
    or a URI), with ``options`` set by ``dvc remote modify`` (e.g. ``endpointurl`` for an S3-compatible server)."""
    repo = Path(repo)
    if not (repo / ".dvc").exists():
        dvc(repo, "init", "-q", *([] if (repo / ".git").exists() else ["--no-scm"]))
    # a relative path is taken relative to the repo (dvc runs there and stores it relative to .dvc/)
    dvc(repo, "remote", "add", "-d", "-f", "storage", str(remote))
    for key, value in (options or {}).items():
        dvc(repo, "remote", "modify", "storage", key, str(value))


def track(repo: Path, data_dir: str = "data") -> str:
    """``dvc add data`` -> the new content hash recorded in ``data.dvc``."""
    dvc(Path(repo), "add", "-q", data_dir)
    return data_hash(repo, data_dir)


def data_hash(repo: Path, data_dir: str = "data") -> str | None:
    f = Path(repo) / f"{data_dir}.dvc"
    if not f.exists():
        return None
    outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def push(repo: Path, data_dir: str = "data") -> str:
    return dvc(Path(repo), "push", "-q", f"{data_dir}.dvc")


def pull(repo: Path, data_dir: str = "data") -> str:
    return dvc(Path(repo), "pull", "-q", f"{data_dir}.dvc")


def version_store(store: StoreConfig, to_remote: bool = True) -> StoreVersion:
    """``dvc add <top folder of store.root>`` in ``store.dvc_repo`` (and push to the configured remote); the DVC
    hash is the store's version for lineage. A store on object storage is not under DVC: its versions are the
    Lance table versions (each run's ``lineage.version.*`` tags; ``store.versions`` pins them)."""
    if not isinstance(store.root, Path):
        return StoreVersion(dvc=f"not used: store.root {store.root} is on object storage, versioned by its Lance "
                                "table versions (pin them with store.versions); DVC versioning applies to a local "
                                "store.root")
    repo_path = Path(store.dvc_repo).resolve()
    try:
        data_dir = Path(store.root).resolve().relative_to(repo_path).parts[0]
    except ValueError:
        raise ValueError(f"store.root {store.root} is not inside store.dvc_repo {repo_path}") from None
    ensure_repo(repo_path, store.dvc_remote, store.dvc_remote_options)
    md5 = track(repo_path, data_dir)
    if to_remote:
        push(repo_path, data_dir)
    return StoreVersion(dvc_hash=md5, data_dir=data_dir)
