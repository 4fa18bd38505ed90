"""Experiment files: YAML under ``configs/`` (a file may ``extends:`` another), ``--set key.path=value``
overrides, the one-line description of a validation error, and the tuned files ``mm tune`` writes under
``configs/tuned/``. The schemas themselves live in ``models.config``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from models.config import ConfigError, ExperimentConfig, to_overrides
from stores.datasets.base import datasets_root


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:  # e.g. a cron string "* * * * *": keep it as text
        value = raw
    return key.strip().split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {k} is not a section")
    tree[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (optional, may ``extends:`` another file) + dotted overrides -> validated config, with
    ``data.data_dir`` resolved when unset (``$MM_DATASETS_DIR``, else ``../shared/datasets``) so it is logged."""
    tree: dict = {}
    if path:
        tree = read_yaml(Path(path))
    for item in overrides or []:
        keys, value = parse_override(item)
        set_path(tree, keys, value)
    return validate(tree, f" {path}" if path else "")


def validate(tree: dict, source: str = "") -> ExperimentConfig:
    """A config tree (e.g. a logged run's ``config.yaml``) -> validated config; errors as one ConfigError line."""
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid config{source}: {describe(e)}") from None
    if cfg.data.data_dir is None:
        cfg.data.data_dir = datasets_root(cfg.data)
    return cfg


def describe(e: ValidationError) -> str:
    """Each error on one line part: the dotted field, pydantic's message and the value given."""
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a check across sections: its message names the fields
            parts.append(msg)
            continue
        hidden = err["type"] in ("missing", "extra_forbidden") or loc.startswith("store.storage_options")  # secrets
        given = "" if hidden else f" (got {err.get('input')!r})"
        parts.append(f"{loc}: {msg}{given}")
    return "; ".join(parts)


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    base = tree.pop("extends", None)
    if base:
        merged = read_yaml((path.parent / base).resolve())
        deep_merge(merged, tree)
        return merged
    return tree


def deep_merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v


# ---------------------------------------------------------------- config trees: tuned files
def nest(flat: dict[str, Any]) -> dict:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}}."""
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        cur = tree
        for k in parents:
            cur = cur.setdefault(k, {})
        cur[leaf] = v
    return tree


def with_tree(cfg: ExperimentConfig, tree: dict) -> ExperimentConfig:
    """``cfg`` with a partial config tree merged in (the merge ``extends:`` uses; validated again)."""
    base = cfg.model_dump(mode="json")
    if "head" in tree and tree["head"].get("name", base["head"]["name"]) != base["head"]["name"]:
        base["head"] = {}  # another head: start from its defaults
    deep_merge(base, tree)
    return ExperimentConfig.model_validate(base)


def write_tuned(path: Path, tree: dict, source_config: str | Path | None, note: str) -> Path:
    """YAML a run can use directly (``-c``, it ``extends:`` the tuned config) or ``extends:`` itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"extends": os.path.relpath(Path(source_config).resolve(), path.parent.resolve())} if source_config else {}
    tree = {**tree, "tune": {**tree.get("tune", {}), "applied": path.stem}}  # marks its runs "tuned"
    text = "".join(f"# {line}\n" for line in note.splitlines())
    text += f"# as overrides: {' '.join('--set ' + o for o in to_overrides(tree))}\n"
    path.write_text(text + yaml.safe_dump({**body, **tree}, sort_keys=False))
    return path


def load_tuned(path: Path) -> dict:
    """The tuned settings of ``path`` (without its ``extends:``)."""
    tree = yaml.safe_load(Path(path).read_text()) or {}
    tree.pop("extends", None)
    return tree


def looks_like_path(model: str) -> bool:
    """A local path rather than a Hugging Face id (``org/name``): absolute, relative with ./ or ../, ~, or with
    more than one separator."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()


def missing_model_path(modality: str, model: str | None) -> str | None:
    """The one-line error for an encoder model given as a local path that does not exist, else None."""
    if model and looks_like_path(model) and not Path(model).expanduser().exists():
        return (f"encoders.{modality}.model: {model} does not exist (a local model file or folder, or a Hugging "
                "Face id such as sentence-transformers/all-MiniLM-L6-v2)")
    return None


def check_encoder_paths(cfg: ExperimentConfig) -> None:
    """ConfigError for the first configured encoder whose model path does not exist: checked by the CLI before
    the heavy imports (a wrong path costs a second, not a Prefect start), again where an encoder is built."""
    for modality, enc in cfg.encoder_configs().items():
        if why := missing_model_path(modality, enc.model):
            raise ConfigError(why)
