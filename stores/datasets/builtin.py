"""Adapters for the bundled datasets (AV-MNIST, Fashion product photos) and the UPMC Food-101 and MM-IMDb
release layouts."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from models.config import DataConfig

from .base import (Dataset, DatasetError, Record, datasets_root, limit_records, read_idx, require_file,
                   split_stratified)


def avmnist(cfg: DataConfig) -> Dataset:
    """FSDD clips paired by digit with MNIST test images (as SMIL's AV-MNIST); ``test_speakers`` held out."""
    root = datasets_root(cfg)
    clips = sorted(require_file(root / "fsdd" / "recordings", "FSDD recordings").glob("*.wav"))
    images = read_idx(require_file(root / "mnist" / "t10k-images-idx3-ubyte.gz", "MNIST images"))
    labels = read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(cfg.seed)
    pools = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
    pattern = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav$")
    parsed = [(c, *pattern.search(c.name).groups()) for c in clips if pattern.search(c.name)]
    unknown = set(cfg.test_speakers) - {s for _, _, s, _ in parsed}
    if unknown:
        raise DatasetError(f"test_speakers {sorted(unknown)} not in FSDD")
    train_keys = [c.name for c, _, s, _ in parsed if s not in cfg.test_speakers]
    val_split = split_stratified(train_keys, [n[0] for n in train_keys], cfg.val_fraction, 0.0, cfg.seed)
    records = []
    for clip, digit, speaker, _ in parsed:
        d = int(digit)
        split = "test" if speaker in cfg.test_speakers else val_split[clip.name]
        records.append(Record(f"{clip.stem}", split, d, {"image": f"mnist:{pools[d].pop()}", "audio": str(clip)}))
    resolve_image = lambda ref: images[int(ref.split(":")[1])]  # noqa: E731
    return Dataset("avmnist", ["image", "audio"], [str(d) for d in range(10)], limit_records(records, cfg),
                   resolvers={"image": resolve_image})


# ---------------------------------------------------------------- Fashion product photos + titles
def fashion(cfg: DataConfig) -> Dataset:
    """Product photo + productDisplayName; label ``label_field`` restricted to classes with >= min_per_class."""
    root = datasets_root(cfg) / "fashion"
    images = require_file(root / "images", "fashion images")
    rows = []
    with open(require_file(root / "styles.csv", "fashion styles.csv"), newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader)
        if cfg.label_field not in header:
            raise DatasetError(f"label_field {cfg.label_field!r} not in styles.csv columns {header}")
        li, ti = header.index(cfg.label_field), header.index("productDisplayName")
        if bad := [a for a in cfg.attributes if a not in header[:ti]]:  # (the title, last, may hold commas)
            raise DatasetError(f"data.attributes: {bad[0]!r} is not a styles.csv column before the title "
                               f"({', '.join(header[:ti])})")
        ai = [header.index(a) for a in cfg.attributes]
        for row in reader:
            img = images / f"{row[0]}.jpg"
            if img.exists():
                title = ",".join(row[ti:]).strip().strip(",").strip()  # titles may contain commas
                rows.append((row[0], row[li], title, str(img), {a: row[i] or None for a, i in zip(cfg.attributes, ai)}))
    counts = Counter(r[1] for r in rows)
    classes = sorted(c for c, n in counts.items() if n >= cfg.min_per_class)
    rows = [r for r in rows if r[1] in classes]
    split = split_stratified([r[0] for r in rows], [r[1] for r in rows], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    index = {c: i for i, c in enumerate(classes)}
    records = [Record(pid, split[pid], index[lab], {"image": img, "text": title}, attrs)
               for pid, lab, title, img, attrs in rows]
    return Dataset("fashion", ["image", "text"], classes, limit_records(records, cfg))

def food101(cfg: DataConfig) -> Dataset:
    """UPMC Food-101 release: images/{train,test}/{class}/{file}.jpg and texts/{train,test}_titles.csv with
    rows ``file,text,class`` (no header). Validation is carved from train, stratified."""
    root = datasets_root(cfg)
    rows = []
    for split in ("train", "test"):
        with open(require_file(root / "texts" / f"{split}_titles.csv", "Food-101 titles"), newline="", encoding="utf-8") as f:
            for fname, text, cls in csv.reader(f):
                rows.append((split, fname, text, cls, str(root / "images" / split / cls / fname)))
    classes = sorted({r[3] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    train = [r for r in rows if r[0] == "train"]
    val = split_stratified([r[1] for r in train], [r[3] for r in train], cfg.val_fraction, 0.0, cfg.seed)
    records = [Record(Path(f).stem, val.get(f, "train") if s == "train" else "test", index[c],
                      {"image": img, "text": t}) for s, f, t, c, img in rows]
    return Dataset("food101", ["image", "text"], classes, limit_records(records, cfg))


def mmimdb(cfg: DataConfig) -> Dataset:
    """MM-IMDb release: dataset/{id}.jpeg + dataset/{id}.json ("plot": [..], "genres": [..]) and split.json
    {"train": [...], "dev": [...], "test": [...]}. Multi-label genres."""
    root = datasets_root(cfg)
    splits = json.loads(require_file(root / "split.json", "MM-IMDb split.json").read_text())
    items = []
    for split, ids in splits.items():
        for i in ids:
            meta = json.loads(require_file(root / "dataset" / f"{i}.json", "MM-IMDb metadata").read_text())
            plot = meta.get("plot") or [""]
            items.append((str(i), {"dev": "val"}.get(split, split), meta.get("genres", []),
                          plot[0] if isinstance(plot, list) else str(plot), str(root / "dataset" / f"{i}.jpeg")))
    classes = sorted({g for it in items for g in it[2]})
    index = {c: k for k, c in enumerate(classes)}
    records = [Record(i, s, [index[g] for g in gs], {"image": img, "text": plot}) for i, s, gs, plot, img in items]
    return Dataset("mmimdb", ["image", "text"], classes, limit_records(records, cfg), task="multilabel")
