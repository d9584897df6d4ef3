"""CSV and TSV datasets: one record per row, streamed by pyarrow's CSV reader in blocks.

A header row names the columns; the text column and `meta` columns are chosen as for
Parquet (`text_field`, `meta_fields`). Every column is read as a string (a CSV has no
types, and a guess from the first block can fail on a later one). Quoted values may
span lines. A row with the wrong number of fields is quarantined (`invalid_row`, by its
line when pyarrow knows it) and the rest of the file goes on.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from refinery.tasks.ingest.base import Context, Format, Item, Problem, ReadError, Rows, split_name, text_field
from refinery.tasks.ingest.compression import COMPRESSION
from refinery.tasks.ingest.formats.parquet import BATCH_ROWS, batch_items, meta_columns

BLOCK_BYTES = 4 * 2**20  # bytes parsed at once


def _delimiter(name: str) -> str:
    """Tab for `.tsv`/`.tab` files, also compressed ones (`x.tsv.gz`); else comma."""
    base, ext = split_name(name)
    if ext in COMPRESSION and ext != ".tgz":
        base, ext = split_name(base[: -len(ext)])
    return "\t" if ext in (".tsv", ".tab") else ","


def stream_csv(name: str, opener: Callable[[], BinaryIO], ctx: Context) -> Iterator[Item | Rows]:
    """Records of a CSV/TSV file; `opener()` gives its (decompressed) bytes from the start, twice."""
    import pyarrow.csv as pacsv

    problems: list[Problem] = []

    def bad_row(row: Any) -> str:
        where = f"line {row.number}" if row.number is not None else "a row"
        problems.append(Problem("invalid_row", f"{where}: {row.actual_columns} fields where the header has "
                                               f"{row.expected_columns}: {row.text[:200]!r}"))
        return "skip"

    parse = pacsv.ParseOptions(delimiter=_delimiter(name), newlines_in_values=True, invalid_row_handler=bad_row)
    read = pacsv.ReadOptions(block_size=BLOCK_BYTES)
    try:
        with opener() as f:  # the header alone: the column names
            names = pacsv.open_csv(f, read_options=read, parse_options=parse).schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        if "Empty CSV file" in str(exc):
            raise ReadError("no_records", "CSV file holds no header row") from exc
        raise ReadError("corrupt", f"unreadable CSV: {exc}") from exc
    column = text_field(names, ctx.cfg, "csv", "CSV file")
    meta_cols = meta_columns(pa.schema([(n, pa.string()) for n in names]), column, ctx)
    convert = pacsv.ConvertOptions(column_types={n: pa.large_string() if n == column else pa.string() for n in names},
                                   include_columns=[column, *meta_cols], strings_can_be_null=False)
    pos = 0
    problems.clear()
    try:
        with opener() as f:
            reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                yield from problems
                problems.clear()
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    part = batch.slice(start, BATCH_ROWS)
                    yield from batch_items(part, column, meta_cols, pos, "csv", ctx, "CSV")
                    pos += part.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"CSV file broken after row {pos}: {exc}") from exc
    yield from problems


def read_csv(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """A CSV/TSV file held in memory (an archive member)."""
    for item in stream_csv(name, lambda: io.BytesIO(data), ctx):
        if isinstance(item, Rows):
            yield from item.docs()
        else:
            yield item


CSV = Format("csv", read_csv, extensions={".csv", ".tsv", ".tab"})
