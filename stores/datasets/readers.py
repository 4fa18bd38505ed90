"""One streaming reader per shard format: ``read(fs, path, want)`` yields the shard's rows as Arrow record batches
of at most ``BATCH_ROWS`` rows, with those of the columns ``want`` the shard has, under its own column names
(``sources.py`` maps, types and checks them; Parquet batches are fewer rows when rows are large, see
``_batch_rows``). Parquet goes through ``pyarrow.parquet`` page by page, CSV and Arrow IPC through
``pyarrow.dataset``; JSONL and WebDataset tars have readers of their own (said why at each)."""
from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .base import DatasetError, groups

BATCH_ROWS = 1024
BATCH_BYTES = 8 << 20  # a Parquet batch's rows hold about this much (24 KB images: 349 rows)
PARQUET_BUFFER = 4 << 20  # bytes per column read at a time (one ranged GET on an object store)
IMAGE_EXT = ("jpg", "jpeg", "png", "webp")
AUDIO_EXT = ("wav", "flac")
WEBDATASET_COLUMNS = ("id", "split", "label", "image", "text", "audio")

Read = Callable[[pafs.FileSystem, str, list[str]], Iterator[pa.RecordBatch]]


def _dataset_batches(dataset: pads.Dataset, want: list[str]) -> Iterator[pa.RecordBatch]:
    have = set(dataset.schema.names)  # a short read-ahead: batches of image bytes are tens of MB each
    yield from dataset.to_batches(columns=[c for c in want if c in have], batch_size=BATCH_ROWS, batch_readahead=2)


def read_parquet(fs: pafs.FileSystem, path: str, want: list[str]) -> Iterator[pa.RecordBatch]:
    """Page by page through a buffered stream, not row group by row group: ``pyarrow.dataset`` (and a pre-buffered
    ``ParquetFile``) holds a whole row group's column chunks, and a shard written as one row group of image bytes
    (``pq.write_table``'s default up to 1M rows) is then read whole (21 MB against 7 MB for a 16k-row shard)."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER, pre_buffer=False)
        have = set(pf.schema_arrow.names)
        yield from pf.iter_batches(batch_size=_batch_rows(pf.metadata), columns=[c for c in want if c in have])


def _batch_rows(meta: pq.FileMetaData) -> int:
    """Rows per batch: ``BATCH_ROWS``, fewer when the rows are large (photos), so a batch is about
    ``BATCH_BYTES`` (from the first row group's uncompressed size)."""
    if not meta.num_row_groups or not meta.row_group(0).num_rows:
        return BATCH_ROWS
    per_row = meta.row_group(0).total_byte_size / meta.row_group(0).num_rows
    return int(max(1, min(BATCH_ROWS, BATCH_BYTES // max(per_row, 1))))


def csv_header(fs: pafs.FileSystem, path: str) -> list[str]:
    """The column names of a CSV shard's first line (read alone, so every column can be typed as text)."""
    with io.BufferedReader(fs.open_input_stream(path)) as f:
        return next(csv.reader([f.readline().decode("utf-8-sig", errors="replace")]), [])


def read_csv(fs: pafs.FileSystem, path: str, want: list[str]) -> Iterator[pa.RecordBatch]:
    """Every column as text, as Python's csv module read them (type inference would make id 007 the number 7 and
    fail a streamed column whose later rows change type); quoted newlines allowed."""
    names = csv_header(fs, path)
    fmt = pads.CsvFileFormat(parse_options=pacsv.ParseOptions(newlines_in_values=True),
                             convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
    yield from _dataset_batches(pads.dataset(path, filesystem=fs, format=fmt), want)


def read_arrow(fs: pafs.FileSystem, path: str, want: list[str]) -> Iterator[pa.RecordBatch]:
    """Arrow IPC: the stream format Hugging Face ``save_to_disk`` writes, or the file (Feather v2) format."""
    with fs.open_input_file(path) as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            reader = pa.ipc.open_file(f)
            batches: Iterable[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = reader
        keep = [c for c in want if c in reader.schema.names]
        for batch in batches:
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS).select(keep)


def json_column(values: list[Any]) -> pa.Array:
    """Python values as one Arrow column; a column mixing kinds (labels 1 and "1", lists beside scalars) as text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        if any(isinstance(v, list) for v in values):
            return pa.array([None if v is None else [str(x) for x in (v if isinstance(v, list) else [v])]
                             for v in values], pa.list_(pa.string()))
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _batches_of(rows: Iterable[dict], want: list[str]) -> Iterator[pa.RecordBatch]:
    """Rows (dicts) as record batches of ``BATCH_ROWS``, with the ``want`` columns the first row of each has."""
    for chunk in groups(rows, BATCH_ROWS):
        yield _batch(chunk, want)


def _batch(rows: list[dict], want: list[str]) -> pa.RecordBatch:
    keys = [c for c in want if any(c in r for r in rows)]
    return pa.RecordBatch.from_arrays([json_column([r.get(c) for r in rows]) for c in keys], names=keys)


def read_jsonl(fs: pafs.FileSystem, path: str, want: list[str]) -> Iterator[pa.RecordBatch]:
    """Own reader: pyarrow.json refuses a column whose values change type (labels 1 and "1", which manifests
    have) and names no line in its errors; this one names the line that is not UTF-8 or not JSON."""
    def rows() -> Iterator[dict]:
        with io.BufferedReader(fs.open_input_stream(path)) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"manifest {path} line {n} is not UTF-8 ({e.reason} at byte {e.start}); "
                                       "re-save it as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"manifest {path} line {n} is not valid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise DatasetError(f"manifest {path} line {n} is not a JSON object")
                yield row
    yield from _batches_of(rows(), want)


def tar_samples(fs: pafs.FileSystem, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per WebDataset sample: members sharing a key (the path up to the first dot of
    the file name) lie next to each other. Own reader: pyarrow has no tar format; tarfile's streaming mode
    (``r|*``, compressed or not) reads each member once, in order, with no seek (object storage)."""
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, name = posixpath.split(member.name)
            stem, _, ext = name.partition(".")
            if posixpath.join(folder, stem) != key:
                if key is not None:
                    yield key, parts
                key, parts = posixpath.join(folder, stem), {}
            parts[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield key, parts


def sample_row(key: str, parts: dict[str, bytes], path: str) -> dict[str, Any]:
    """A WebDataset sample as a row: id = its key; label from ``.cls`` or the ``.json`` field ``label``; split
    from the ``.json`` field ``split``; image/audio bytes by extension; text from ``.txt``; the ``.json``'s
    other fields as columns (``data.attributes`` picks among them)."""
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError as e:
            raise DatasetError(f"manifest {path}: sample {key}'s .json is not valid JSON ({e})") from None
    extra = {k: v for k, v in meta.items() if k not in WEBDATASET_COLUMNS}  # attributes (data.attributes)
    row = {**extra, "id": meta.get("id", key), "split": meta.get("split"),
           "label": parts["cls"].decode("utf-8", errors="replace") if "cls" in parts else meta.get("label")}
    for m, exts in (("image", IMAGE_EXT), ("audio", AUDIO_EXT)):
        row[m] = next((parts[e] for e in exts if e in parts), None)
    if "txt" in parts:  # undecodable bytes become U+FFFD: a caption is never worth the shard
        row["text"] = parts["txt"].decode("utf-8", errors="replace")
    return row


def read_webdataset(fs: pafs.FileSystem, path: str, want: list[str]) -> Iterator[pa.RecordBatch]:
    rows = (sample_row(key, parts, path) for key, parts in tar_samples(fs, path))
    for batch in _batches_of(rows, want):  # image and audio bytes stay binary even when a batch has none
        yield pa.RecordBatch.from_arrays(
            [c.cast(pa.binary()) if n in ("image", "audio") else c for n, c in zip(batch.schema.names, batch.columns)],
            names=batch.schema.names)


READERS: dict[str, Read] = {"parquet": read_parquet, "csv": read_csv, "jsonl": read_jsonl,
                            "webdataset": read_webdataset, "arrow": read_arrow}
