"""DVC lineage for the feature store: ``data.dvc`` tracks ``data/``; push/pull to a remote (a local folder by
default, or an object store such as ``s3://bucket/path`` through dvc-s3)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


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
