"""Rows set aside on local disk while a stream is read, to be read back as a stream once it ends: an Arrow IPC
stream file in a temporary folder, written and read a batch at a time, so what a diff decides to write never
piles up in memory. Arrow's IPC format rather than a Lance table: nothing here is versioned or searched, and the
file is gone when the ``with`` block ends."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa


class ArrowSpool:
    """``add`` batches of one schema, then ``batches()`` / ``reader()`` them back in order (any number of times)."""

    def __init__(self, schema: pa.Schema, folder: str | Path | None = None):
        self.schema = schema
        self._dir = tempfile.TemporaryDirectory(prefix="mm-spool-", dir=folder)
        self.path = Path(self._dir.name) / "rows.arrows"
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self.num_rows = 0

    def add(self, rows: pa.RecordBatch | pa.Table) -> None:
        if rows.num_rows:
            self._writer.write(rows.select(self.schema.names).cast(self.schema))
            self.num_rows += rows.num_rows

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def batches(self) -> Iterator[pa.RecordBatch]:
        self._close_writer()
        with pa.OSFile(str(self.path), "rb") as f:
            yield from pa.ipc.open_stream(f)

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, self.batches())

    def close(self) -> None:
        self._close_writer()
        self._dir.cleanup()

    def __enter__(self) -> "ArrowSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
