"""Parquet and Arrow IPC datasets, streamed in batches: the text column and the `meta` columns only.

The text column is `text_field` (unset: the first of `text`, `content`, `raw_content`);
`meta_fields` (unset: every scalar column) go into `meta`, with `row`, the record number.
Other columns are never decoded. A null, non-string, empty or oversize (`max_record_bytes`)
value is quarantined by its row; the text of valid rows stays an Arrow array throughout.
Parquet is read by row group (`row_groups`), so one file can be split into work units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from refinery.tasks.ingest.base import Context, Format, Item, Problem, ReadError, Rows, text_field
from refinery.tasks.ingest.config import META_VALUE_CHARS

BATCH_ROWS = 2048  # rows decoded at once: memory is bounded by this many records


def _scalar(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t)
            or pa.types.is_decimal(t) or pa.types.is_dictionary(t) and _scalar(t.value_type))


def meta_columns(schema: pa.Schema, column: str, ctx: Context) -> list[str]:
    """Columns copied into `meta`: `meta_fields` (those present), else every scalar column."""
    if ctx.cfg.meta_fields is not None:
        return [c for c in ctx.cfg.meta_fields if c in schema.names and c != column]
    return [f.name for f in schema if f.name != column and _scalar(f.type)]


def _json(meta: dict[str, Any]) -> str:
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()


def batch_items(
    batch: pa.RecordBatch, column: str, meta_cols: list[str], first: int, fmt: str, ctx: Context, what: str
) -> Iterator[Rows | Problem]:
    """The records of one batch: valid ones as one `Rows` block, the others as `Problem`s by row number."""
    text = batch.column(column)
    n = batch.num_rows
    if n == 0:
        return
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        for i in range(n):
            why = "null" if not text[i].is_valid else f"a {text.type}, not a string"
            yield Problem("missing_text_field", f"{what} row {first + i}: {column!r} is {why}", first + i)
        return
    limit = ctx.cfg.max_record_bytes
    sizes = pc.binary_length(text)
    blank = pc.or_(pc.equal(sizes, 0), pc.utf8_is_space(text))
    valid = pc.and_(pc.less_equal(sizes, limit), pc.invert(blank))
    valid = pc.fill_null(valid, False)
    if not pc.all(valid).as_py():
        for i in pc.indices_nonzero(pc.invert(valid)).to_pylist():
            where, value = f"{what} row {first + i}", sizes[i].as_py()
            if value is None:
                yield Problem("missing_text_field", f"{where}: {column!r} is null", first + i)
            elif value > limit:
                yield Problem("too_large", f"{where}: {value} bytes is over max_record_bytes={limit}", first + i)
            else:
                yield Problem("no_text", f"{where}: {column!r} is empty", first + i)
        keep = pc.indices_nonzero(valid)
        batch = batch.take(keep)
        rows = [first + i for i in keep.to_pylist()]
    else:
        rows = list(range(first, first + n))
    if not rows:
        return
    metas = _meta_vectorized(batch, meta_cols, rows, ctx.cfg.meta_fields is None)
    if metas is None:
        metas = _meta_rows(batch, meta_cols, rows, ctx.cfg.meta_fields is None)
    yield Rows(batch.column(column), rows, metas, fmt)


_NEEDS_ESCAPE = r'[\x00-\x1f"\\]'


def _meta_vectorized(batch: pa.RecordBatch, meta_cols: list[str], rows: list[int], check_long: bool) -> list[str] | None:
    """`meta` JSON built with Arrow string kernels: the common case of plain strings, integers and booleans
    with no nulls and nothing to escape. None when a column needs the general path."""
    pieces: list[tuple[str, pa.Array]] = [("row", pa.array(rows, pa.int64()).cast(pa.string()))]
    for name in meta_cols:
        col = batch.column(name)
        if col.null_count:
            return None
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if pc.any(pc.match_substring_regex(col, _NEEDS_ESCAPE)).as_py():
                return None
            if check_long and pc.max(pc.utf8_length(col)).as_py() > META_VALUE_CHARS:
                return None
            value = pc.binary_join_element_wise('"', col.cast(pa.string()), '"', "")
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            value = col.cast(pa.string())
        else:
            return None
        pieces.append((name, value))
    pieces.sort(key=lambda kv: kv[0])
    parts: list[Any] = []
    for i, (name, value) in enumerate(pieces):
        parts += [("{" if i == 0 else ",") + orjson.dumps(name).decode() + ":", value]
    parts.append("}")
    return pc.binary_join_element_wise(*parts, "").to_pylist()


def _meta_rows(batch: pa.RecordBatch, meta_cols: list[str], rows: list[int], check_long: bool) -> list[str]:
    values = [batch.column(c).to_pylist() for c in meta_cols]
    metas = []
    for j, row in enumerate(rows):
        meta: dict[str, Any] = {"row": row}
        for name, vals in zip(meta_cols, values, strict=True):
            v = vals[j]
            if v is not None and not (check_long and isinstance(v, str) and len(v) > META_VALUE_CHARS):
                meta[name] = v
        metas.append(_json(meta))
    return metas


def stream_parquet(source: Any, ctx: Context, row_groups: range | None = None, first: int = 0) -> Iterator[Item | Rows]:
    """Records of a Parquet file (a path, pyarrow file or file object), row group by row group.

    `row_groups` limits the read to a work unit; `first` is the record number of its first row.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"unreadable Parquet: {exc}") from exc
    schema = pf.schema_arrow
    column = text_field(schema.names, ctx.cfg, "parquet", "Parquet file")
    meta_cols = meta_columns(schema, column, ctx)
    groups = list(row_groups) if row_groups is not None else list(range(pf.num_row_groups))
    pos = first
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=[column, *meta_cols]):
            yield from batch_items(batch, column, meta_cols, pos, "parquet", ctx, "Parquet")
            pos += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"Parquet file broken at row {pos}: {exc}") from exc


def stream_arrow(source: Any, ctx: Context) -> Iterator[Item | Rows]:
    """Records of an Arrow IPC file or stream, batch by batch."""
    pos = 0
    try:
        try:
            reader: Any = pa.ipc.open_file(source)
            batches: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            if hasattr(source, "seek"):
                source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        schema = reader.schema
        column = text_field(schema.names, ctx.cfg, "arrow", "Arrow file")
        meta_cols = meta_columns(schema, column, ctx)
        for batch in batches:
            batch = batch.select([column, *meta_cols])
            yield from _split(batch, lambda b, p: batch_items(b, column, meta_cols, p, "parquet", ctx, "Arrow"), pos)
            pos += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"Arrow IPC file unreadable at row {pos}: {exc}") from exc


def _split(batch: pa.RecordBatch, items: Callable[[pa.RecordBatch, int], Iterator[Any]], first: int) -> Iterator[Any]:
    """A writer's batch can be any size: take it BATCH_ROWS rows at a time."""
    for start in range(0, batch.num_rows, BATCH_ROWS):
        yield from items(batch.slice(start, BATCH_ROWS), first + start)


def _expand(items: Iterator[Item | Rows]) -> Iterator[Item]:
    for item in items:
        if isinstance(item, Rows):
            yield from item.docs()
        else:
            yield item


def read_parquet(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """A Parquet file held in memory (an archive member)."""
    yield from _expand(stream_parquet(pa.BufferReader(data), ctx))


def read_arrow(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """An Arrow IPC file or stream held in memory (an archive member)."""
    yield from _expand(stream_arrow(pa.BufferReader(data), ctx))


PARQUET = Format("parquet", read_parquet, extensions={".parquet"})
ARROW = Format("arrow", read_arrow, extensions={".arrow", ".feather", ".ipc"})
