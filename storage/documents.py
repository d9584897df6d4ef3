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

import pyarrow as pa
import pyarrow.dataset as ds
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

FORMATS = ("text", "code", "markdown", "html", "pdf", "docx", "pptx", "image", "jsonl", "parquet", "warc")


class ParquetWriter:
    """Writes record batches to one Parquet file atomically.

    The schema is fixed by the first batch (or `schema`); batches are cast to
    it. `close()` renames the temporary file into place and returns its
    manifest entry; an empty writer still produces a valid, empty file so that
    downstream readers never special-case "no file".
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema | None = None) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._writer: pq.ParquetWriter | None = None

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
        if data.num_rows == 0 and self._writer is not None:
            return
        if self._writer is None:
            self._writer = self._open(self.schema or data.schema)
        if data.schema != self.schema:
            data = data.select(self.schema.names).cast(self.schema)
        self._writer.write_table(data, row_group_size=ROW_GROUP_SIZE)
        self.rows += data.num_rows

    def close(self, stage_dir: str | os.PathLike[str] | None = None) -> OutputFile:
        if self._writer is None:
            if self.schema is None:
                raise ValueError(f"{self.path}: no schema known for an empty file")
            self._writer = self._open(self.schema)
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

    Rolls to a new part every `rows_per_part` rows, so very large stages stay
    as files of manageable size. Each part is atomic on its own.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        schema: pa.Schema | None = None,
        prefix: str = "part",
        rows_per_part: int = 500_000,
    ) -> None:
        self.directory = Path(directory)
        self.schema = schema
        self.prefix = prefix
        self.rows_per_part = rows_per_part
        self.outputs: list[OutputFile] = []
        self._current: ParquetWriter | None = None
        self._stage_dir = self.directory

    def _next(self) -> ParquetWriter:
        name = f"{self.prefix}-{len(self.outputs):05d}.parquet"
        return ParquetWriter(self.directory / name, schema=self.schema)

    def write(self, data: pa.RecordBatch | pa.Table | Sequence[dict[str, Any]]) -> None:
        if self._current is None:
            self._current = self._next()
        self._current.write(data)
        if self.schema is None:
            self.schema = self._current.schema
        if self._current.rows >= self.rows_per_part:
            self.outputs.append(self._current.close(self._stage_dir))
            self._current = None

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
    """Stream record batches from Parquet files in order, with bounded memory."""
    for path in paths:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def count_rows(paths: Iterable[str | os.PathLike[str]]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def read_table(paths: Sequence[str | os.PathLike[str]], columns: list[str] | None = None) -> pa.Table:
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no Parquet files to read")
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
