"""Parquet tables of documents, dropped documents and quarantined files.

Every stage reads and writes documents through this module, so the schema in
the design (id, text, source, format, bytes, meta, plus columns later stages
add) is enforced in one place. Files are zstd-compressed with row groups of
about 10k rows and are written atomically: a part file appears complete or
not at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery.storage.atomic import TMP_PREFIX, atomic_path
from refinery.storage.manifest import OutputFile, describe_file

ROW_GROUP_SIZE = 10_000

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
    ]
)

DROPPED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
    ]
)

FORMATS = ("text", "code", "markdown", "html", "pdf", "docx", "pptx", "image", "jsonl", "parquet", "csv", "warc")


MAX_GROUP_BYTES = 64 * 2**20


def _row_bytes(table: pa.Table) -> np.ndarray:
    """Approximate bytes of each row: the lengths of its string and binary values (the bulk of a document)."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        t = column.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
    return sizes


class ParquetWriter:
    """Writes record batches to one Parquet file atomically, in row groups fixed by the rows alone.

    The schema is fixed by the first batch (or `schema`); batches are cast to
    it. Rows are buffered and cut into row groups of `row_group_size` rows, or
    fewer where their text passes `MAX_GROUP_BYTES`: the cut depends on the rows,
    not on how they were batched into `write` calls, so the same rows always
    give the same bytes (a resumed run writes exactly what an uninterrupted one
    would). `close()` renames the temporary file into place and returns its
    manifest entry; an empty writer still produces a valid, empty file so that
    downstream readers never special-case "no file".
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: pa.Schema | None = None,
        row_group_size: int = ROW_GROUP_SIZE,
    ) -> None:
        self.path = Path(path)
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows = 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    def _open(self, schema: pa.Schema) -> pq.ParquetWriter:
        self.schema = schema
        return pq.ParquetWriter(self._tmp, schema, compression="zstd")

    def write(self, data: pa.RecordBatch | pa.Table | Sequence[dict[str, Any]]) -> None:
        if isinstance(data, Sequence) and not isinstance(data, (pa.RecordBatch, pa.Table)):
            if not data:
                return
            data = pa.Table.from_pylist(list(data), schema=self.schema)
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if self._writer is None:
            self._writer = self._open(self.schema or data.schema)
        if data.num_rows == 0:
            return
        if data.schema != self.schema:
            data = data.select(self.schema.names).cast(self.schema)
        self._pending.append(data)
        self._pending_rows += data.num_rows
        self._pending_bytes += int(_row_bytes(data).sum())
        self.rows += data.num_rows
        while self._pending_rows >= self.row_group_size or self._pending_bytes >= MAX_GROUP_BYTES:
            self._flush_group()

    def _flush_group(self) -> None:
        """Write the next row group from the buffer: `row_group_size` rows or up to the byte bound."""
        table = pa.concat_tables(self._pending).combine_chunks()
        sizes = _row_bytes(table)
        n = min(self.row_group_size, table.num_rows)
        over = np.nonzero(np.cumsum(sizes[:n]) > MAX_GROUP_BYTES)[0]
        if len(over):
            n = max(1, int(over[0]))
        assert self._writer is not None
        self._writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._pending_bytes = int(sizes[n:].sum())

    def close(self, stage_dir: str | os.PathLike[str] | None = None) -> OutputFile:
        if self._writer is None:
            if self.schema is None:
                raise ValueError(f"{self.path}: no schema known for an empty file")
            self._writer = self._open(self.schema)
        while self._pending_rows:
            self._flush_group()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        base = Path(stage_dir) if stage_dir is not None else self.path.parent
        return describe_file(base, self.path, rows=self.rows)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        try:
            raise RuntimeError("aborted")
        except RuntimeError as exc:
            try:
                self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            except RuntimeError:
                pass

    def __enter__(self) -> ParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.close()
        else:
            self.abort()


class PartWriter:
    """Writes a table as numbered part files (`part-00000.parquet`, ...).

    Starts a new part every `rows_per_part` rows exactly (incoming batches are
    split at the boundary), so very large stages stay as files of manageable
    size and the split does not depend on batching. Each part is atomic on its own.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        schema: pa.Schema | None = None,
        prefix: str = "part",
        rows_per_part: int = 500_000,
        row_group_size: int = ROW_GROUP_SIZE,
    ) -> None:
        self.directory = Path(directory)
        self.schema = schema
        self.prefix = prefix
        self.rows_per_part = rows_per_part
        self.row_group_size = row_group_size
        self.outputs: list[OutputFile] = []
        self._current: ParquetWriter | None = None
        self._stage_dir = self.directory

    def _next(self) -> ParquetWriter:
        name = f"{self.prefix}-{len(self.outputs):05d}.parquet"
        return ParquetWriter(self.directory / name, schema=self.schema, row_group_size=self.row_group_size)

    def write(self, data: pa.RecordBatch | pa.Table | Sequence[dict[str, Any]]) -> None:
        if isinstance(data, Sequence) and not isinstance(data, (pa.RecordBatch, pa.Table)):
            if not data:
                return
            data = pa.Table.from_pylist(list(data), schema=self.schema)
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        while True:
            if self._current is None:
                self._current = self._next()
            room = self.rows_per_part - self._current.rows
            head, data = data.slice(0, room), data.slice(room)
            self._current.write(head)
            if self.schema is None:
                self.schema = self._current.schema
            if self._current.rows >= self.rows_per_part:
                self.outputs.append(self._current.close(self._stage_dir))
                self._current = None
            if data.num_rows == 0:
                return

    def adopt(self, path: str | os.PathLike[str]) -> None:
        """Take a finished documents file (written by a parallel worker) as the next part, whole.

        The part being written is closed first, so rows keep their order; the file is moved
        into place under the next part name.
        """
        if self._current is not None:
            if self._current.rows:
                self.outputs.append(self._current.close(self._stage_dir))
            else:
                self._current.abort()
            self._current = None
        target = self.directory / f"{self.prefix}-{len(self.outputs):05d}.parquet"
        os.replace(path, target)
        self.outputs.append(describe_file(self._stage_dir, target, rows=pq.ParquetFile(target).metadata.num_rows))

    @property
    def rows(self) -> int:
        done = sum(o.rows for o in self.outputs)
        return done + (self._current.rows if self._current else 0)

    def close(self) -> list[OutputFile]:
        if self._current is not None or not self.outputs:
            writer = self._current or self._next()
            self.outputs.append(writer.close(self._stage_dir))
            self._current = None
        return self.outputs


def document_files(stage_dir: str | os.PathLike[str], prefix: str = "part") -> list[Path]:
    """The document part files of a stage, in order (temporaries excluded)."""
    return sorted(
        p for p in Path(stage_dir).glob(f"{prefix}-*.parquet") if not p.name.startswith(TMP_PREFIX)
    )


def iter_batches(
    paths: Iterable[str | os.PathLike[str]],
    columns: list[str] | None = None,
    batch_size: int = ROW_GROUP_SIZE,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from Parquet files in order, with bounded memory.

    Pre-buffering is off: with it, a reader keeps every byte it has read until it is closed, so one large
    file would be held in memory whole.
    """
    for path in paths:
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def count_rows(paths: Iterable[str | os.PathLike[str]]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def read_table(paths: Sequence[str | os.PathLike[str]], columns: list[str] | None = None) -> pa.Table:
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no Parquet files to read")
    import pyarrow.dataset as ds  # here, not at the top: it imports pandas, slowing every worker's start

    return ds.dataset(paths, format="parquet").to_table(columns=columns)


def dropped_rows(ids: Sequence[str], sources: Sequence[str], stage: str, reasons: Sequence[str], details: Sequence[str]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "source": pa.array(sources, pa.string()),
            "stage": pa.array([stage] * len(ids), pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
        },
        schema=DROPPED_SCHEMA,
    )
