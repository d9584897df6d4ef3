"""Work units: the descriptors sent to workers, and how dataset files are streamed record by record.

A *dataset* file (JSON Lines, a JSON array, Parquet, Arrow IPC, CSV/TSV, WARC) is read as a
stream of records: memory is bounded by a batch of records, never by the file, and limits apply
per record (`max_record_bytes`), not per file (`max_file_bytes`, `file_timeout_s` and, within
reason, `max_decompressed_bytes` do not apply). Zip and tar archives are streamed too, member by
member (see `formats/archives.py`: each member is held to the per-file limits, all of them to
`max_decompressed_bytes`). Other files (PDF, DOCX, HTML, text...) are single documents, read
whole under the per-file limits.

A big dataset file is split into units so several workers share it: Parquet by ranges of
row groups, uncompressed JSON Lines by byte ranges cut at line starts (found by one scan that
also counts lines and hashes the file), WARC (plain, or gzip with one member per record) by
byte ranges cut at record starts (found by one pass over the record headers that also counts
records and hashes the file). A compressed stream, a JSON array, CSV, Arrow IPC and archives are
one unit each. A unit is a descriptor (file, range, number of its first record), never file data;
record numbers (`#n`) are positions in the whole file, so ids don't depend on the split.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from refinery.tasks.ingest.base import Context, Doc, Item, Problem, ReadError, Rows, split_name
from refinery.tasks.ingest.compression import COMPRESSION, CountingReader, open_stream
from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.formats import format_for
from refinery.tasks.ingest.sources import SourceFile, open_source
from refinery.tasks.ingest.watchdog import FileTimeout

DATASET_KINDS = frozenset({"jsonl", "json", "parquet", "arrow", "csv", "warc", "zip", "tar"})
# Parquet, Arrow and zip need random access: compressed, they are decompressed whole under the per-file limits
_STREAMED_WHEN_COMPRESSED = frozenset({"jsonl", "json", "csv", "warc", "tar"})
SCAN_BLOCK = 8 * 2**20
_NOT_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit, FileTimeout)  # never a quarantine row
_SPLIT_WARC = (".warc", ".warc.gz")  # record offsets are seekable: plain, or one gzip member per record
_PROBE_FAILURES = 8  # candidate cuts that are not record starts before a .warc.gz counts as one gzip stream
PARQUET_RATIO = 4  # Parquet units are cut by uncompressed size; a file this much smaller than a unit may hold several
WARC_GZ_RATIO = 4  # gzip shrinks HTML about this much: a .warc.gz unit of batch_bytes / 4 holds about batch_bytes


def warc_unit_bytes(rel: str, cfg: IngestConfig) -> int:
    """Raw bytes per WARC work unit: `batch_bytes`, a quarter of it for a .warc.gz (about as much HTML)."""
    return cfg.batch_bytes // WARC_GZ_RATIO if rel.lower().endswith(".gz") else cfg.batch_bytes


@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole file, or a range of a dataset file.

    `kind` is the dataset kind streamed (None: the file is read whole under the per-file
    limits). `start`/`stop` are row groups (Parquet) or byte offsets (JSON Lines, WARC), `stop=-1`
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
    if split_name(rel)[1] == ".tgz":
        return "tar"
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
    """The units of one file: several for a big Parquet, uncompressed JSON Lines or WARC file, else one."""
    kind = None if sf.error else dataset_kind(sf.rel)
    if kind is None:
        yield Unit(sf)
        return
    if sf.size > cfg.batch_bytes // PARQUET_RATIO and kind == "parquet":
        yield from _parquet_units(sf, cfg)
    elif sf.size > cfg.batch_bytes and kind == "jsonl" and not _compressed(sf.rel):
        yield from _jsonl_units(sf, cfg)
    elif kind == "warc" and sf.size > warc_unit_bytes(sf.rel, cfg) and sf.rel.lower().endswith(_SPLIT_WARC):
        yield from _warc_units(sf, cfg)
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


class _Hashing(CountingReader):
    """The planner's scan of a file, which doubles as the file's hash (FastWARC asks it where it starts)."""

    def __init__(self, raw: Any) -> None:
        super().__init__(raw, hashlib.sha256())
        self.sha256 = self.hasher

    def drain(self) -> None:
        """Read (and hash) the rest of the file."""
        while self.read(SCAN_BLOCK):
            pass


def _warc_units(sf: SourceFile, cfg: IngestConfig) -> Iterator[Unit]:
    """Byte ranges cut at record starts, found by one pass over the record headers that also counts
    the records (so `#n` is the record's number in the whole file, as in a whole-file read) and
    hashes the file. Yielded as found, so workers start on the first while the pass goes on.

    A .warc.gz is cut only where a gzip member opens with a WARC header (one member per record, as
    crawlers write them); one gzip stream over the whole file stays one unit. Where the pass stops
    on a record it can't read, the rest of the file from the last good record is the final unit,
    whose reader quarantines that record and resynchronises as a whole-file read would.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    from refinery.tasks.ingest.formats.warc import opens_record

    gzipped = sf.rel.lower().endswith(".gz")
    start = first = part = count = failures = 0
    step = warc_unit_bytes(sf.rel, cfg)
    target = step
    try:
        with open_source(sf) as f, open_source(sf) as probe:
            hashed = _Hashing(f)
            records = ArchiveIterator(hashed, record_types=WarcRecordType.any_type, parse_http=False,
                                      buffer_size=1 << 20)
            for record in records:
                at = record.stream_pos
                if at >= target and failures < _PROBE_FAILURES:
                    if opens_record(probe, at, gzipped):
                        yield Unit(sf, "warc", start, at, first, part, False, nbytes=at - start)
                        start, first, part, target = at, count, part + 1, at + step
                    else:
                        failures += 1
                        if failures == _PROBE_FAILURES and part == 0:
                            break  # one gzip stream: nothing to cut, only the hash to finish
                count += 1
            hashed.drain()
    except _NOT_CAUGHT:
        raise
    except BaseException:  # noqa: BLE001 (a record the pass can't read, a FastWARC panic: the last unit says)
        yield Unit(sf, "warc", start, -1, first, part, True, hash_file=True, nbytes=max(sf.size - start, 0))
        return
    yield Unit(sf, "warc", start, -1, first, part, True, sha256=hashed.sha256.hexdigest(),
               nbytes=hashed.count - start)


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
    elif kind == "json":
        from refinery.tasks.ingest.formats.jsonl import stream_json

        with open_source(sf) as raw:
            yield from stream_json(open_stream(sf.rel, raw, cfg.max_decompressed_bytes)[1], ctx)
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
        yield from _warc_items(unit, ctx)
    elif kind in ("zip", "tar"):
        from refinery.tasks.ingest.formats.archives import stream_archive

        with open_source(sf) as raw:
            yield from stream_archive(sf.rel, raw, ctx)
    else:
        raise ValueError(f"not a dataset kind: {kind!r}")


def _warc_items(unit: Unit, ctx: Context) -> Iterator[Item]:
    """WARC responses of a unit: the records that start in its byte range, numbered from `unit.first`."""
    from refinery.tasks.ingest.formats.warc import read_warc_stream

    with open_source(unit.file) as f:
        if unit.start:
            f.seek(unit.start)
        try:
            yield from _record_limit(read_warc_stream(unit.file.rel, f, ctx, unit.first, unit.stop),
                                     ctx.cfg.max_record_bytes)
        except _NOT_CAUGHT:
            raise
        except Exception:
            raise
        except BaseException as exc:  # a panic in FastWARC's Rust code: one row, not a crash
            raise ReadError("corrupt", f"WARC reader failed: {type(exc).__name__}: {exc}") from exc


def _record_limit(items: Iterator[Item], limit: int) -> Iterator[Item]:
    for item in items:
        if isinstance(item, Doc) and item.nbytes > limit:
            yield Problem("too_large", f"record {item.pos}: {item.nbytes} bytes is over max_record_bytes={limit}",
                          item.pos)
        else:
            yield item
