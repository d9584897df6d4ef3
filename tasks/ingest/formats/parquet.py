"""Parquet and Arrow IPC datasets: the `parquet_text_column` only, streamed in batches.

Other columns are never decoded; a null, non-string or empty value is quarantined by row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError


def _dataset_batches(table_like: Any, column: str, where: str) -> Iterator[Item]:
    pos = 0
    for batch in table_like:
        for value in batch.column(0).to_pylist():
            if value is None:
                yield Problem("missing_text_field", f"{where} row {pos}: {column!r} is null", pos)
            elif not isinstance(value, str):
                yield Problem("missing_text_field", f"{where} row {pos}: {column!r} is not a string", pos)
            elif not value.strip():
                yield Problem("no_text", f"{where} row {pos}: {column!r} is empty", pos)
            else:
                yield Doc(value, "parquet", len(value.encode("utf-8")), {"row": pos}, pos)
            pos += 1


def _missing_column(column: str, names: list[str]) -> ReadError:
    return ReadError("missing_text_column",
                     f"no column {column!r} (columns: {', '.join(names)}); set parquet_text_column")


def read_parquet(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Stream the text column in batches; other columns are never decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = ctx.cfg.parquet_text_column
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"unreadable Parquet: {exc}") from exc
    names = pf.schema_arrow.names
    if column not in names:
        raise _missing_column(column, names)
    try:
        yield from _dataset_batches(pf.iter_batches(batch_size=4096, columns=[column]), column, "Parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"Parquet file broken part-way: {exc}") from exc


def read_arrow(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    import pyarrow as pa

    column = ctx.cfg.parquet_text_column
    try:
        try:
            reader: Any = pa.ipc.open_file(pa.BufferReader(data))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_stream(pa.BufferReader(data))
            batches = iter(reader)
        names = reader.schema.names
        if column not in names:
            raise _missing_column(column, names)
        idx = names.index(column)
        selected = (b.select([idx]) for b in batches)
        yield from _dataset_batches(selected, column, "Arrow")
    except pa.ArrowInvalid as exc:
        raise ReadError("corrupt", f"unreadable Arrow IPC file: {exc}") from exc


PARQUET = Format("parquet", read_parquet, extensions={".parquet"})
ARROW = Format("arrow", read_arrow, extensions={".arrow", ".feather", ".ipc"})
