"""Users' sources at scale: ``data.manifest`` as a file, a folder or a glob of shards, local or in object storage
(``s3://bucket/prefix/*.parquet``, through ``pyarrow.fs`` with the store's ``AWS_*`` settings), read shard by shard
as Arrow record batches in one schema, so a consumer holds one batch at a time:

    id: string, split: string (train/val/test), label: list<string> (class names),
    image / audio: struct<bytes: binary, path: string>, text: string   (the modalities the source has; null = absent)
    <attribute>: string   (each of ``data.attributes``, as text; null where a row has no value)

Formats: Parquet, CSV, JSONL, WebDataset ``.tar`` shards and Hugging Face ``save_to_disk`` folders (Arrow IPC).
A shard that cannot be read at all is a ``DatasetError`` naming it; a bad item inside one (corrupt bytes) is
left to the encoder, which stores it as missing with its reason."""
from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.config import DataConfig
from models.errors import first_line

from .base import DatasetError
from .labels import label_name
from .readers import READERS, WEBDATASET_COLUMNS, csv_header, sample_row, tar_samples

MODALITIES = ("image", "text", "audio")
FIELDS = ("id", "split", "label", *MODALITIES)
FILE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TYPES = {"id": pa.string(), "split": pa.string(), "label": pa.list_(pa.string()), "image": FILE,
         "text": pa.string(), "audio": FILE}
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".tar": "webdataset",
            ".tgz": "webdataset", ".arrow": "arrow"}
GLOB = re.compile(r"[*?\[]")
UNREADABLE = (OSError, ValueError, EOFError, pa.ArrowException, tarfile.TarError, UnicodeDecodeError)
HF_MARKERS = ("dataset_dict.json", "state.json")


def path_split(rel: str) -> str | None:
    """The split a shard's path names: a folder (``train/``, ``validation/``) or a file name's first word
    (``train-00000-of-00004.parquet``, ``test.jsonl``), the first from the source's root down."""
    for part in rel.split("/"):
        if (word := re.split(r"[-_.]", part, maxsplit=1)[0].lower()) in SPLITS:
            return SPLITS[word]
    return None


def suffix_format(path: str) -> str | None:
    """The reader a shard's suffix names (``.gz`` looked through: ``.tar.gz``, ``.jsonl.gz``)."""
    name = path.lower().removesuffix(".gz")
    return next((f for s, f in SUFFIXES.items() if name.endswith(s)), None)


def is_multilabel(batch: pa.RecordBatch) -> bool:
    """Whether a batch's label cells were lists or ``a|b`` (the dataset is then multi-label)."""
    return (batch.schema.metadata or {}).get(b"multilabel") == b"1"


@dataclass(frozen=True)
class Shard:
    path: str  # in the source's filesystem
    url: str  # as a user names it (errors, a remote shard's path cells)
    format: str  # a key of readers.READERS
    split: str | None  # named by its path (or its Hugging Face split)


class Source:
    """``data.manifest`` resolved: its filesystem, its shards (sorted; a DatasetDict's in its split order) and
    the root folder its relative paths may reach (with ``data.allowed_roots``)."""

    def __init__(self, cfg: DataConfig):
        if cfg.manifest is None:
            raise DatasetError("dataset=manifest needs data.manifest (a file, folder or glob of .csv, .jsonl, "
                               ".parquet or .tar shards, or a Hugging Face save_to_disk folder)")
        self.cfg, self.url = cfg, str(cfg.manifest)
        self.remote = "://" in self.url
        self.names = {f: cfg.columns.get(f, f) for f in FIELDS}
        self.attributes = list(cfg.attributes)
        self.fs, path = self._filesystem()
        self.root, self.shards = self._discover(path)
        if not self.shards:
            raise DatasetError(f"manifest {self.url}: no shards found (expected .csv, .jsonl, .parquet, .tar or "
                               "a Hugging Face save_to_disk folder)")
        self._ids: dict[str, int] = {}

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if not self.remote:
            return pafs.LocalFileSystem(), os.path.abspath(self.url)
        if self.url.lower().startswith("s3://"):  # the store's S3 settings: AWS_ENDPOINT_URL, AWS_REGION, keys
            from stores.features.location import s3_filesystem, s3_options
            return s3_filesystem(s3_options(None)), self.url.split("://", 1)[1].rstrip("/")
        return pafs.FileSystem.from_uri(self.url)

    def _url(self, path: str) -> str:
        return f"{self.url.split('://', 1)[0]}://{path}" if self.remote else path

    def _discover(self, path: str) -> tuple[str, list[Shard]]:
        parts = path.split("/")
        if (glob := next((i for i, p in enumerate(parts) if GLOB.search(p)), None)) is not None:
            root = "/".join(parts[:glob]) or "/"
            return root, self._shards(root, [f for f in self._listing(root) if fnmatch.fnmatchcase(f, path)])
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return posixpath.dirname(path), self._shards(posixpath.dirname(path), [path])
        if info.type != pafs.FileType.Directory:
            raise DatasetError(f"manifest not found at {self.url}")
        if self.cfg.format in ("auto", "hf") and any(self._exists(f"{path}/{m}") for m in HF_MARKERS):
            return path, self._hf_shards(path)
        files = [f for f in self._listing(path) if suffix_format(f) is not None and "/." not in f[len(path):]
                 and "/_" not in f[len(path):]]  # hidden files and _SUCCESS-like markers are not shards
        return path, self._shards(path, files)

    def _listing(self, folder: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _format(self, path: str) -> str | None:
        """A shard's reader: ``data.format``, else (auto, hf) by its suffix."""
        return self.cfg.format if self.cfg.format not in ("auto", "hf") else suffix_format(path)

    def _shards(self, root: str, files: list[str]) -> list[Shard]:
        out = []
        for f in files:
            if (fmt := self._format(f)) is None:
                raise DatasetError(f"manifest {self._url(f)}: unknown shard format; set data.format (one of "
                                   "parquet, jsonl, csv, webdataset, hf) or select the shards with a glob")
            out.append(Shard(f, self._url(f), fmt, path_split(f[len(root):].lstrip("/"))))
        return out

    def _json(self, path: str) -> dict:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except UNREADABLE as e:
            raise DatasetError(f"manifest {self._url(path)} cannot be read ({first_line(e, 200)})") from None

    def _hf_shards(self, folder: str, split: str | None = None) -> list[Shard]:
        """A ``save_to_disk`` folder: a DatasetDict's splits (``dataset_dict.json``), each a Dataset whose
        ``state.json`` lists its Arrow files in order."""
        if self._exists(f"{folder}/dataset_dict.json"):
            names = self._json(f"{folder}/dataset_dict.json").get("splits", [])
            if unknown := [s for s in names if path_split(s) is None]:
                raise DatasetError(f"manifest {self.url}: split {unknown[0]!r} is not train, validation or test; "
                                   "point data.manifest at the splits to use: a glob of their Arrow files "
                                   "(<folder>/t*/*.arrow)")
            return [s for name in names for s in self._hf_shards(f"{folder}/{name}", path_split(name))]
        state = self._json(f"{folder}/state.json")
        split = split or path_split(str(state.get("_split") or "")) or path_split(posixpath.basename(folder))
        return [Shard(f"{folder}/{d['filename']}", self._url(f"{folder}/{d['filename']}"), "arrow", split)
                for d in state.get("_data_files", [])]

    def listing(self) -> list[list]:
        """Each shard's [path, size, modification time in ns], in reading order."""
        infos = self.fs.get_file_info([s.path for s in self.shards])
        return [[s.url, i.size, i.mtime_ns] for s, i in zip(self.shards, infos)]

    # ------------------------------------------------------------------ what the source holds
    @cached_property
    def columns(self) -> list[str]:
        """The first shard's columns (a WebDataset's fields: those its first samples have)."""
        first = self.shards[0]
        try:
            if first.format == "webdataset":
                rows = [sample_row(k, p, first.url) for k, p in islice(tar_samples(self.fs, first.path), 64)]
                return [c for c in (*WEBDATASET_COLUMNS, *self.attributes) if any(r.get(c) is not None for r in rows)]
            if first.format == "csv":
                return csv_header(self.fs, first.path)
            if first.format == "jsonl":
                want = list(self.names.values()) + self.attributes
                return list(next(READERS["jsonl"](self.fs, first.path, want)).schema.names)
            return self._schema(first).names
        except StopIteration:
            return []
        except UNREADABLE as e:
            raise DatasetError(f"manifest shard {first.url} cannot be read ({first_line(e, 200)})") from None

    def _schema(self, shard: Shard) -> pa.Schema:
        if shard.format == "parquet":
            with self.fs.open_input_file(shard.path) as f:
                return pq.read_schema(f)
        with self.fs.open_input_file(shard.path) as f:
            try:
                return pa.ipc.open_stream(f).schema
            except pa.ArrowInvalid:
                f.seek(0)
                return pa.ipc.open_file(f).schema

    @cached_property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if self.names[m] in self.columns]

    def check_attributes(self) -> None:
        """``data.attributes`` the first shard lacks: one line naming them (a later shard without one reads as
        null values)."""
        if missing := [a for a in self.attributes if a not in self.columns]:
            raise DatasetError(f"manifest {self.url} has no column {missing[0]!r} (data.attributes); its columns: "
                               f"{', '.join(self.columns[:20])}")

    @cached_property
    def class_names(self) -> list[str] | None:
        """The names of a Hugging Face ``ClassLabel`` label column (its integers index them), from the Arrow or
        Parquet schema metadata ``datasets`` writes."""
        first = self.shards[0]
        if first.format not in ("arrow", "parquet"):
            return None
        meta = (self._schema(first).metadata or {}).get(b"huggingface")
        features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}
        feature = features.get(self.names["label"]) or {}
        return feature.get("names") if feature.get("_type") == "ClassLabel" else None

    # ------------------------------------------------------------------ reading
    def batches(self, payloads: bool = True) -> Iterator[pa.RecordBatch]:
        """Every row, shard by shard, as record batches in the module's schema (see the docstring); without the
        modality columns when not ``payloads`` (Parquet and Arrow then skip reading the image/audio bytes)."""
        mods = self.modalities if payloads else []
        want = [self.names[f] for f in ("id", "split", "label")] + [self.names[m] for m in mods] + self.attributes
        schema = pa.schema([(f, TYPES[f]) for f in ("id", "split", "label", *mods)]
                           + [(a, pa.string()) for a in self.attributes])
        offset, self._ids = 0, {}  # generated ids count from 0 on every pass
        for shard in self.shards:
            for raw in self._raw(shard, want):
                if raw.num_rows:
                    yield self._normalise(raw, shard, offset, schema, mods)
                    offset += raw.num_rows

    def _raw(self, shard: Shard, want: list[str]) -> Iterator[pa.RecordBatch]:
        """A shard's raw batches; any failure to read it is one line naming it."""
        try:
            yield from READERS[shard.format](self.fs, shard.path, want)
        except DatasetError:
            raise
        except UNREADABLE as e:
            if "UTF8" in str(e):
                raise DatasetError(f"manifest {shard.url} line {self._bad_utf8_line(shard)} is not UTF-8; "
                                   "re-save it as UTF-8") from None
            raise DatasetError(f"manifest shard {shard.url} cannot be read ({first_line(e, 200)})") from None

    def _bad_utf8_line(self, shard: Shard) -> int | str:
        with self.fs.open_input_stream(shard.path) as f:
            for n, line in enumerate(f.read().splitlines(), 1):  # an error path only: the whole file is fine
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return n
        return "?"

    def _normalise(self, raw: pa.RecordBatch, shard: Shard, offset: int, schema: pa.Schema,
                   mods: list[str]) -> pa.RecordBatch:
        have = set(raw.schema.names)
        if missing := [self.names[f] for f in ("label", "split") if self.names[f] not in have
                       and (f == "label" or shard.split is None)]:
            hint = " (or a split named by its path: train/, val/, test/, train-*.parquet)" if \
                self.names["split"] in missing else ""
            raise DatasetError(f"manifest {shard.url} lacks columns {missing}{hint}")
        col = {f: raw.column(self.names[f]) if self.names[f] in have else None for f in FIELDS}
        n = raw.num_rows
        split = self._splits(col["split"], shard, n)
        ids = pc.cast(col["id"], pa.string()) if col["id"] is not None else self._row_ids(split)
        self._check(ids, offset, pc.is_valid(ids), lambda i: "empty id")
        self._check(ids, offset, pc.is_in(split, value_set=pa.array(["train", "val", "test"])),
                    lambda i: f"split {split[i].as_py()!r} not in train/val/test")
        label, multilabel = self._labels(col["label"])
        self._check(ids, offset, pc.greater(pc.list_value_length(label), 0), lambda i: "empty label")
        out = [ids, split, label]
        for m in mods:
            c = col[m] if col[m] is not None else pa.nulls(n)
            out.append(self._text(c) if m == "text" else self._file_cells(c, shard, m, offset))
        out += [self._attribute(raw.column(a) if a in have else pa.nulls(n), a, shard) for a in self.attributes]
        return pa.RecordBatch.from_arrays(out, schema=schema.with_metadata({"multilabel": "1" if multilabel else "0"}))

    @staticmethod
    def _check(ids: pa.Array, offset: int, ok: pa.Array, what: Callable[[int], str]) -> None:
        """One line naming the first row where ``ok`` is false (or null)."""
        bad = pc.invert(pc.fill_null(ok, False))
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise DatasetError(f"manifest row {offset + i} (id={ids[i].as_py()}): {what(i)}")

    def _splits(self, c: pa.Array | None, shard: Shard, n: int) -> pa.Array:
        c = pa.nulls(n, pa.string()) if c is None else pc.cast(c, pa.string())
        if shard.split:
            c = pc.fill_null(c, shard.split)
        return _per_value(c, lambda v: SPLITS.get(v, v), pa.string())

    def _row_ids(self, split: pa.Array) -> pa.Array:
        """``<split>-<index in the split>`` when the source has no id column (a Hugging Face dataset)."""
        out = []
        for s in split.to_pylist():
            out.append(f"{s}-{self._ids.get(s, 0)}")
            self._ids[s] = self._ids.get(s, 0) + 1
        return pa.array(out, pa.string())

    def _labels(self, c: pa.Array) -> tuple[pa.Array, bool]:
        """Class names per row (``labels.label_name``; ``a|b`` and list cells split), and whether any cell was
        multi-label. A ``ClassLabel``'s integers become its names."""
        if self.class_names and pa.types.is_integer(c.type):
            c = pa.array(self.class_names, pa.string()).take(pc.if_else(pc.less(c, 0), None, c))
        if pa.types.is_list(c.type) or pa.types.is_large_list(c.type):
            cells = [None if v is None else [n for x in v for n in label_name(x).split("|") if n]
                     for v in c.to_pylist()]
            return pa.array([v or [] for v in cells], pa.list_(pa.string())), True
        names = _per_value(c, lambda v: [n for n in label_name(v).split("|") if n], pa.list_(pa.string()))
        multilabel = pc.any(pc.greater(pc.list_value_length(names), 1)).as_py() or \
            (pa.types.is_string(c.type) and pc.any(pc.match_substring(c, "|")).as_py())
        return pc.fill_null(names, pa.scalar([], pa.list_(pa.string()))), bool(multilabel)

    @staticmethod
    def _attribute(c: pa.Array, name: str, shard: Shard) -> pa.Array:
        """An attribute column as text (numbers and booleans written as such, empty text as null)."""
        try:
            c = pc.cast(c, pa.string())
        except (pa.ArrowException, ValueError):
            raise DatasetError(f"manifest {shard.url}: attribute column {name!r} ({c.type}) is not text, a number "
                               "or a boolean") from None
        return pc.if_else(pc.equal(c, ""), pa.scalar(None, pa.string()), c)

    @staticmethod
    def _text(c: pa.Array) -> pa.Array:
        c = pc.cast(c, pa.string())
        return pc.if_else(pc.equal(c, ""), pa.scalar(None, pa.string()), c)

    def _file_cells(self, c: pa.Array, shard: Shard, m: str, offset: int) -> pa.StructArray:
        """An image/audio column as ``{bytes, path}``: a binary column, a path relative to the shard's folder,
        or the struct Hugging Face ``datasets`` writes (``bytes`` first, as it reads them)."""
        t = c.type
        if pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} & {"bytes", "path"}:
            names = {t.field(i).name for i in range(t.num_fields)}
            data = pc.struct_field(c, "bytes") if "bytes" in names else pa.nulls(len(c), pa.binary())
            path = pc.struct_field(c, "path") if "path" in names else pa.nulls(len(c), pa.string())
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t):
            data, path = c, pa.nulls(len(c), pa.string())
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            data, path = pa.nulls(len(c), pa.binary()), c
        else:
            i = pc.index(pc.is_valid(c), True).as_py()
            raise DatasetError(f"manifest {shard.url} row {offset + max(i, 0)}: column {self.names[m]!r} holds "
                               f"{type(c[max(i, 0)].as_py()).__name__} values; supported are a path relative to "
                               "the manifest, the file's bytes, or a {bytes, path} struct")
        if path.null_count < len(path):  # paths relative to the shard's folder (absolute ones stay)
            folder = posixpath.dirname(shard.path)
            path = pa.array([self._url(posixpath.join(folder, p)) if p else None for p in path.to_pylist()])
        return pa.StructArray.from_arrays([pc.cast(data, pa.binary()), pc.cast(path, pa.string())],
                                          fields=list(FILE), mask=pc.is_null(c))


def _per_value(c: pa.Array, f, out_type: pa.DataType) -> pa.Array:
    """``f`` applied once per distinct value of ``c`` (a handful of splits or classes in a million rows)."""
    coded = pc.dictionary_encode(c)
    return pa.array([f(v) for v in coded.dictionary.to_pylist()], out_type).take(coded.indices)


def iter_batches(cfg: DataConfig) -> Iterator[pa.RecordBatch]:
    """The source ``cfg.manifest`` names, as record batches in the module's schema (bounded memory)."""
    return Source(cfg).batches()
