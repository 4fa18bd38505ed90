"""Dataset adapters: every source becomes one manifest schema (``base.Dataset``); ``load_dataset`` picks the
adapter ``data.dataset`` names."""
from __future__ import annotations

from typing import Callable

from models.config import DataConfig

from .base import Dataset, DatasetError, Record, datasets_root
from .builtin import avmnist, fashion, food101, mmimdb
from .manifest import manifest

__all__ = ["Dataset", "DatasetError", "Record", "datasets_root", "load_dataset", "ADAPTERS"]




ADAPTERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "avmnist": avmnist, "fashion": fashion, "manifest": manifest, "food101": food101, "mmimdb": mmimdb}


def load_dataset(cfg: DataConfig) -> Dataset:
    return ADAPTERS[cfg.dataset](cfg)
