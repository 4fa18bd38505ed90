"""Dataset adapters: every dataset becomes one manifest schema (id, split, label, per-modality payload or None)."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.config import DataConfig


class DatasetError(ValueError):
    """A dataset cannot be read as configured (missing files, bad manifest, bad labels)."""


@dataclass
class Record:
    id: str
    split: str
    label: int | list[int]
    payload: dict[str, Any]  # modality -> file path / text / in-memory reference, or None when absent


@dataclass
class Dataset:
    name: str
    modalities: list[str]
    classes: list[str]
    records: list[Record]
    task: str = "multiclass"
    resolvers: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # modality -> ref -> raw input

    def raw(self, modality: str, ref: Any) -> Any:
        """The raw input behind a payload reference (a path unless the adapter resolves it itself)."""
        return self.resolvers[modality](ref) if modality in self.resolvers else ref

    @property
    def version(self) -> str:
        """Content hash of the manifest: ids, splits, labels, payload refs and referenced file sizes."""
        h = hashlib.sha256(f"{self.name}|{self.task}|{self.classes}|{self.modalities}".encode())
        for r in self.records:
            sizes = {m: Path(v).stat().st_size for m, v in r.payload.items()
                     if isinstance(v, str) and m != "text" and Path(v).is_file()}
            h.update(json.dumps([r.id, r.split, r.label, {m: str(v) for m, v in r.payload.items()}, sizes],
                                sort_keys=True).encode())
        return h.hexdigest()[:16]


def _split_stratified(keys: list[Any], labels: list[Any], val: float, test: float, seed: int) -> dict[Any, str]:
    rng = np.random.default_rng(seed)
    by_class: dict[Any, list[Any]] = defaultdict(list)
    for k, y in zip(keys, labels):
        by_class[y].append(k)
    out = {}
    for y in sorted(by_class, key=str):
        ks = list(by_class[y])
        rng.shuffle(ks)
        n_test, n_val = int(round(test * len(ks))), int(round(val * len(ks)))
        for i, k in enumerate(ks):
            out[k] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _limit(records: list[Record], cfg: DataConfig) -> list[Record]:
    if cfg.limit is None or cfg.limit >= len(records):
        return records
    keep = np.random.default_rng(cfg.seed).permutation(len(records))[: cfg.limit]
    return [records[i] for i in sorted(keep)]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found at {path} (set data.data_dir or MM_DATASETS_DIR)")
    return path


# ---------------------------------------------------------------- AV-MNIST (FSDD audio + MNIST image)
def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def avmnist(cfg: DataConfig) -> Dataset:
    """FSDD clips paired by digit with MNIST test images (as SMIL's AV-MNIST); ``test_speakers`` held out."""
    root = cfg.data_dir
    clips = sorted(_require(root / "fsdd" / "recordings", "FSDD recordings").glob("*.wav"))
    images = read_idx(_require(root / "mnist" / "t10k-images-idx3-ubyte.gz", "MNIST images"))
    labels = read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(cfg.seed)
    pools = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
    pattern = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav$")
    parsed = [(c, *pattern.search(c.name).groups()) for c in clips if pattern.search(c.name)]
    unknown = set(cfg.test_speakers) - {s for _, _, s, _ in parsed}
    if unknown:
        raise DatasetError(f"test_speakers {sorted(unknown)} not in FSDD")
    train_keys = [c.name for c, _, s, _ in parsed if s not in cfg.test_speakers]
    val_split = _split_stratified(train_keys, [n[0] for n in train_keys], cfg.val_fraction, 0.0, cfg.seed)
    records = []
    for clip, digit, speaker, _ in parsed:
        d = int(digit)
        split = "test" if speaker in cfg.test_speakers else val_split[clip.name]
        records.append(Record(f"{clip.stem}", split, d, {"image": f"mnist:{pools[d].pop()}", "audio": str(clip)}))
    resolve_image = lambda ref: images[int(ref.split(":")[1])]  # noqa: E731
    return Dataset("avmnist", ["image", "audio"], [str(d) for d in range(10)], _limit(records, cfg),
                   resolvers={"image": resolve_image})


# ---------------------------------------------------------------- Fashion product photos + titles
def fashion(cfg: DataConfig) -> Dataset:
    """Product photo + productDisplayName; label ``label_field`` restricted to classes with >= min_per_class."""
    root = cfg.data_dir / "fashion"
    images = _require(root / "images", "fashion images")
    rows = []
    with open(_require(root / "styles.csv", "fashion styles.csv"), newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader)
        if cfg.label_field not in header:
            raise DatasetError(f"label_field {cfg.label_field!r} not in styles.csv columns {header}")
        li, ti = header.index(cfg.label_field), header.index("productDisplayName")
        for row in reader:
            img = images / f"{row[0]}.jpg"
            if img.exists():
                title = ",".join(row[ti:]).strip().strip(",").strip()  # titles may contain commas
                rows.append((row[0], row[li], title, str(img)))
    counts = Counter(r[1] for r in rows)
    classes = sorted(c for c, n in counts.items() if n >= cfg.min_per_class)
    rows = [r for r in rows if r[1] in classes]
    split = _split_stratified([r[0] for r in rows], [r[1] for r in rows], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    index = {c: i for i, c in enumerate(classes)}
    records = [Record(pid, split[pid], index[lab], {"image": img, "text": title}) for pid, lab, title, img in rows]
    return Dataset("fashion", ["image", "text"], classes, _limit(records, cfg))


# ---------------------------------------------------------------- users' own manifest
MODALITY_COLUMNS = ("image", "text", "audio")


def _text_of(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(f"manifest {path} line {line} is not UTF-8 ({e.reason} at byte {e.start}); "
                           "re-save it as UTF-8") from None


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(_text_of(path), newline="")))
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(_text_of(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"manifest {path} line {n} is not valid JSON: {e.msg}") from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise DatasetError(f"manifest {path} must be .csv, .jsonl or .parquet")


def manifest(cfg: DataConfig) -> Dataset:
    """CSV/JSONL/Parquet with columns id, split (train/val/test), label ('a|b' or a list for multi-label) and any
    of image/audio (paths, relative to the manifest) and text. Empty cells mean the modality is missing."""
    if cfg.manifest is None:
        raise DatasetError("dataset=manifest needs data.manifest (a .csv, .jsonl or .parquet path)")
    path = _require(Path(cfg.manifest), "manifest")
    rows = _read_table(path)
    if not rows:
        raise DatasetError(f"manifest {path} is empty")
    missing = {"id", "split", "label"} - set(rows[0])
    if missing:
        raise DatasetError(f"manifest {path} lacks columns {sorted(missing)}")
    mods = [m for m in MODALITY_COLUMNS if m in rows[0]]
    as_list = lambda v: v if isinstance(v, list) else [s for s in str(v).split("|") if s]  # noqa: E731
    multilabel = any(isinstance(r["label"], list) or "|" in str(r["label"]) for r in rows)
    labels = [[] if r["label"] in (None, "") else as_list(r["label"]) if multilabel else [str(r["label"])]
              for r in rows]
    classes = list(cfg.classes) if cfg.classes else sorted({c for ls in labels for c in ls})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for n, r in enumerate(rows):
        if r["split"] not in ("train", "val", "test"):
            raise DatasetError(f"manifest row {n} (id={r['id']}): split {r['split']!r} not in train/val/test")
        if not labels[n]:
            raise DatasetError(f"manifest row {n} (id={r['id']}): empty label")
        if unknown := [c for c in labels[n] if c not in index]:
            raise DatasetError(f"manifest row {n} (id={r['id']}): label {unknown[0]!r} is not in data.classes "
                               f"{classes[:10]}{' ...' if len(classes) > 10 else ''}")
        payload = {}
        for m in mods:
            v = r.get(m)
            payload[m] = None if v in (None, "") else (v if m == "text" else str((path.parent / str(v)).resolve()))
        label = [index[c] for c in labels[n]] if multilabel else index[labels[n][0]]
        records.append(Record(str(r["id"]), r["split"], label, payload))
    return Dataset(path.stem, mods, classes, _limit(records, cfg), task="multilabel" if multilabel else
                   ("binary" if len(classes) == 2 else "multiclass"))


# ---------------------------------------------------------------- documented release layouts
def food101(cfg: DataConfig) -> Dataset:
    """UPMC Food-101 release: images/{train,test}/{class}/{file}.jpg and texts/{train,test}_titles.csv with
    rows ``file,text,class`` (no header). Validation is carved from train, stratified."""
    root = cfg.data_dir
    rows = []
    for split in ("train", "test"):
        with open(_require(root / "texts" / f"{split}_titles.csv", "Food-101 titles"), newline="", encoding="utf-8") as f:
            for fname, text, cls in csv.reader(f):
                rows.append((split, fname, text, cls, str(root / "images" / split / cls / fname)))
    classes = sorted({r[3] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    train = [r for r in rows if r[0] == "train"]
    val = _split_stratified([r[1] for r in train], [r[3] for r in train], cfg.val_fraction, 0.0, cfg.seed)
    records = [Record(Path(f).stem, val.get(f, "train") if s == "train" else "test", index[c],
                      {"image": img, "text": t}) for s, f, t, c, img in rows]
    return Dataset("food101", ["image", "text"], classes, _limit(records, cfg))


def mmimdb(cfg: DataConfig) -> Dataset:
    """MM-IMDb release: dataset/{id}.jpeg + dataset/{id}.json ("plot": [..], "genres": [..]) and split.json
    {"train": [...], "dev": [...], "test": [...]}. Multi-label genres."""
    root = cfg.data_dir
    splits = json.loads(_require(root / "split.json", "MM-IMDb split.json").read_text())
    items = []
    for split, ids in splits.items():
        for i in ids:
            meta = json.loads(_require(root / "dataset" / f"{i}.json", "MM-IMDb metadata").read_text())
            plot = meta.get("plot") or [""]
            items.append((str(i), {"dev": "val"}.get(split, split), meta.get("genres", []),
                          plot[0] if isinstance(plot, list) else str(plot), str(root / "dataset" / f"{i}.jpeg")))
    classes = sorted({g for it in items for g in it[2]})
    index = {c: k for k, c in enumerate(classes)}
    records = [Record(i, s, [index[g] for g in gs], {"image": img, "text": plot}) for i, s, gs, plot, img in items]
    return Dataset("mmimdb", ["image", "text"], classes, _limit(records, cfg), task="multilabel")


ADAPTERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "avmnist": avmnist, "fashion": fashion, "manifest": manifest, "food101": food101, "mmimdb": mmimdb}


def load_dataset(cfg: DataConfig) -> Dataset:
    return ADAPTERS[cfg.dataset](cfg)
