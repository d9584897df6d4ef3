"""Work units: the descriptors sent to workers, and how dataset files are streamed record by record.

A *dataset* file (JSON Lines, Parquet, Arrow IPC, CSV/TSV, WARC) is read as a stream of
records: memory is bounded by a batch of records, never by the file, and limits apply per
record (`max_record_bytes`), not per file (`max_file_bytes`, `file_timeout_s` and, within
reason, `max_decompressed_bytes` do not apply). Other files (PDF, DOCX, HTML, text, archives...)
are single documents or small containers, read whole under the per-file limits.

A big dataset file is split into units so several workers share it: Parquet by ranges of
row groups, uncompressed JSON Lines by byte ranges cut at line starts (found by one scan that
also counts lines and hashes the file). A compressed stream, CSV, Arrow IPC and WARC are one
unit each. A unit is a descriptor (file, range, number of its first record), never file data;
record numbers (`#n`) are positions in the whole file, so ids don't depend on the split.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from refinery.tasks.ingest.base import Context, Doc, Item, Problem, ReadError, Rows, split_name
from refinery.tasks.ingest.compression import COMPRESSION, open_stream
from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.formats import format_for
from refinery.tasks.ingest.sources import SourceFile, open_source

DATASET_KINDS = frozenset({"jsonl", "parquet", "arrow", "csv", "warc"})
_STREAMED_WHEN_COMPRESSED = frozenset({"jsonl", "csv", "warc"})  # Parquet and Arrow need random access
SCAN_BLOCK = 8 * 2**20
PARQUET_RATIO = 4  # Parquet units are cut by uncompressed size; a file this much smaller than a unit may hold several


@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole file, or a range of a dataset file.

    `kind` is the dataset kind streamed (None: the file is read whole under the per-file
    limits). `start`/`stop` are row groups (Parquet) or byte offsets (JSON Lines), `stop=-1`
    meaning the end; `first` is the record number of the range's first record. `part` counts
    the units of one file from 0 and `last` marks its final one. `sha256` is the file's hash
    when the planner already knows it; `hash_file` asks this unit to compute it.
    """

    file: SourceFile
    kind: str | None = None
    start: int = 0
    stop: int = -1
    first: int = 0
    part: int = 0
    last: bool = True
    sha256: str | None = None
    hash_file: bool = False
    nbytes: int = -1  # raw bytes of the range, -1: the file's size

    @property
    def whole(self) -> bool:
        return self.part == 0 and self.last


def dataset_kind(rel: str) -> str | None:
    """The dataset kind of a file by its name (compression suffixes peeled), None for other files."""
    name, compressed = rel, False
    while (ext := split_name(name)[1]) in COMPRESSION and ext != ".tgz":
        name, compressed = name[: -len(ext)], True
    fmt = format_for(name)
    if fmt is None or fmt.name not in DATASET_KINDS:
        return None
    if compressed and fmt.name not in _STREAMED_WHEN_COMPRESSED:
        return None  # a gzipped Parquet file: decompressed whole, under the per-file limits
    return fmt.name


def _compressed(rel: str) -> bool:
    return split_name(rel)[1] in COMPRESSION


# -- planning (in the driver: reads Parquet footers, scans big JSON Lines files) --------------


def file_units(sf: SourceFile, cfg: IngestConfig) -> Iterator[Unit]:
    """The units of one file: several for a big Parquet or uncompressed JSON Lines file, else one."""
    kind = None if sf.error else dataset_kind(sf.rel)
    if kind is None:
        yield Unit(sf)
        return
    if sf.size > cfg.batch_bytes // PARQUET_RATIO and kind == "parquet":
        yield from _parquet_units(sf, cfg)
    elif sf.size > cfg.batch_bytes and kind == "jsonl" and not _compressed(sf.rel):
        yield from _jsonl_units(sf, cfg)
    else:
        yield Unit(sf, kind, hash_file=True)


def _parquet_units(sf: SourceFile, cfg: IngestConfig) -> Iterator[Unit]:
    """Ranges of row groups of about `batch_bytes` uncompressed bytes each (what a worker decodes)."""
    import pyarrow.parquet as pq

    try:
        with open_source(sf) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # noqa: BLE001 (an unreadable footer: one unit, whose reader quarantines it)
        yield Unit(sf, "parquet", hash_file=True)
        return
    ranges: list[tuple[int, int, int, int]] = []  # (start, stop, first row, bytes)
    start, first, rows, size, packed = 0, 0, 0, 0, 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        size += rg.total_byte_size
        packed += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        rows += rg.num_rows
        if size >= cfg.batch_bytes or i == meta.num_row_groups - 1:
            ranges.append((start, i + 1, first, packed))
            start, first, size, packed = i + 1, first + rows, 0, 0
            rows = 0
    if not ranges:
        yield Unit(sf, "parquet", hash_file=True)
        return
    for part, (a, b, first_row, nbytes) in enumerate(ranges):
        yield Unit(sf, "parquet", a, b, first_row, part, part == len(ranges) - 1, hash_file=part == 0, nbytes=nbytes)


def _jsonl_units(sf: SourceFile, cfg: IngestConfig) -> Iterator[Unit]:
    """Byte ranges cut at line starts, found by one scan that also counts lines and hashes the file.

    Units are yielded as the scan finds them, so workers start on the first while it goes on.
    """
    h = hashlib.sha256()
    offset = lines = 0
    start = first = part = 0
    target = cfg.batch_bytes
    try:
        with open_source(sf) as f:
            while block := f.read(SCAN_BLOCK):
                h.update(block)
                end = offset + len(block)
                while target < end:
                    idx = block.find(b"\n", target - offset)
                    if idx < 0:
                        target = end
                        break
                    cut = offset + idx + 1
                    first_next = lines + block.count(b"\n", 0, idx + 1)
                    yield Unit(sf, "jsonl", start, cut, first, part, False, nbytes=cut - start)
                    start, first, part = cut, first_next, part + 1
                    target = cut + cfg.batch_bytes
                lines += block.count(b"\n")
                offset = end
    except OSError:
        if part == 0:
            yield Unit(sf, "jsonl", hash_file=True)  # its reader reports the error
            return
        yield Unit(sf, "jsonl", start, -1, first, part, True, hash_file=True)
        return
    yield Unit(sf, "jsonl", start, -1, first, part, True, sha256=h.hexdigest(), nbytes=offset - start)


# -- reading a unit (in a worker) -------------------------------------------------------------


class _Range(io.RawIOBase):
    """The bytes `[start, stop)` of a seekable file, as a stream."""

    def __init__(self, f: Any, start: int, stop: int) -> None:
        f.seek(start)
        self.f = f
        self.left = stop - start if stop >= 0 else -1

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = len(b) if self.left < 0 else min(len(b), self.left)
        if want == 0:
            return 0
        data = self.f.read(want)
        n = len(data)
        b[:n] = data
        if self.left >= 0:
            self.left -= n
        return n


def file_sha256(sf: SourceFile) -> str:
    h = hashlib.sha256()
    with open_source(sf) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _open_arrow(sf: SourceFile) -> Any:
    """A file pyarrow reads natively (no Python in the read path) when local, else the fsspec file."""
    import pyarrow as pa

    return pa.OSFile(sf.path) if sf.is_local else open_source(sf)


def unit_items(unit: Unit, ctx: Context) -> Iterator[Item | Rows]:
    """The records of a dataset unit, streamed; a file-level failure raises ReadError after what was read."""
    sf, kind, cfg = unit.file, unit.kind, ctx.cfg
    if kind == "parquet":
        from refinery.tasks.ingest.formats.parquet import stream_parquet

        groups = range(unit.start, unit.stop) if unit.stop >= 0 else None
        with _open_arrow(sf) as f:
            yield from stream_parquet(f, ctx, groups, unit.first)
    elif kind == "arrow":
        from refinery.tasks.ingest.formats.parquet import stream_arrow

        with _open_arrow(sf) as f:
            yield from stream_arrow(f, ctx)
    elif kind == "jsonl":
        from refinery.tasks.ingest.formats.jsonl import stream_jsonl

        with open_source(sf) as raw:
            if unit.start or unit.stop >= 0:
                stream: BinaryIO = io.BufferedReader(_Range(raw, unit.start, unit.stop), buffer_size=1 << 20)
            else:
                _, stream = open_stream(sf.rel, raw, cfg.max_decompressed_bytes)
            yield from stream_jsonl(stream, ctx, unit.first)
    elif kind == "csv":
        from refinery.tasks.ingest.formats.tabular import stream_csv

        opened: list[Any] = []

        def opener() -> BinaryIO:
            raw = open_source(sf)
            opened.append(raw)
            return open_stream(sf.rel, raw, cfg.max_decompressed_bytes)[1]

        try:
            yield from stream_csv(sf.rel, opener, ctx)
        finally:
            for raw in opened:
                raw.close()
    elif kind == "warc":
        yield from _warc_items(sf, ctx)
    else:
        raise ValueError(f"not a dataset kind: {kind!r}")


def _warc_items(sf: SourceFile, ctx: Context) -> Iterator[Item]:
    """WARC responses: streamed by the WARC module's `read_warc_stream` when it has one, else read whole."""
    from refinery.tasks.ingest.formats import read_blob, warc

    stream_reader = getattr(warc, "read_warc_stream", None)
    limit = ctx.cfg.max_record_bytes
    if stream_reader is not None:
        with open_source(sf) as f:
            items: Iterator[Item] = stream_reader(sf.rel, f, ctx)
            yield from _record_limit(items, limit)
        return
    with open_source(sf) as f:
        data = f.read()
    if not data:
        raise ReadError("empty", "zero-byte file")
    yield from _record_limit(read_blob(sf.rel, data, ctx), limit)


def _record_limit(items: Iterator[Item], limit: int) -> Iterator[Item]:
    for item in items:
        if isinstance(item, Doc) and item.nbytes > limit:
            yield Problem("too_large", f"record {item.pos}: {item.nbytes} bytes is over max_record_bytes={limit}",
                          item.pos)
        else:
            yield item
