"""WARC and WARC.gz, read record by record with FastWARC.

Each `response` record with a 2xx status is a candidate document: HTML goes through the
configured extractor (`html_to_text`), plain text is decoded, and any other content type
is a `Problem` (`unsupported_format`), so what a crawl held and was not used stays
visible. Request, metadata, warcinfo, revisit records and non-2xx responses are not
documents and are passed over without a row. `meta` carries `url` (WARC-Target-URI),
`date` (WARC-Date), `record_id`, `content_type`, `status` and the page `title`.

A record's number (`pos`, `#n` in the source) counts every WARC record in the file from 0,
so it points at the record whatever its type. A record that fails to parse or extract is
a `Problem` naming its number, and reading goes on: after a corrupt record the reader
seeks to the next record start (the next gzip member that opens with a WARC header, or
the next `WARC/1.x` line in an uncompressed file) and resumes there. That needs a
seekable stream; on a pipe the rest of the file is one problem. A file where no record
reads as WARC is a `ReadError` (`corrupt`). Files in the older ARC format are read with
warcio, which FastWARC does not replace there.

A big file is split into work units by byte offsets (`units.py`): a unit starts at a record
start with that record's number and reads the records that start before its `stop`, so the
units of a file give the records of a whole-file read, numbered alike. A resynchronisation
that lands at or past `stop` ends the unit: the next one reads on from there.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError
from refinery.tasks.ingest.compression import CountingReader
from refinery.tasks.ingest.formats.html import html_to_text
from refinery.tasks.ingest.formats.text import decode_text

# Crawl archives hold millions of pages: resiliparse's main-content extraction is ten times trafilatura's speed
# at a lower precision (docs/ingest_web.md has the held-out comparison); `ingest.warc_extractor` picks another.
WARC_EXTRACTOR = "resiliparse"

DEFAULT_MAX_RECORD_BYTES = 64 * 2**20  # used when the config has no `max_record_bytes`
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_TEXT_TYPES = ("text/plain", "text/markdown")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_LINE = re.compile(rb"\nWARC/1\.[01]\r?\n")
_CHARSET = re.compile(r"charset=[\"']?([\w\-:.]+)", re.IGNORECASE)
_SCAN_CHUNK = 1 << 20
_SCAN_TAIL = 4096  # bytes a candidate record start needs after it to be checked


def read_warc_stream(
    name: str, stream: BinaryIO, ctx: Context, first: int = 0, stop: int = -1
) -> Iterator[Item]:
    """Documents and problems of a WARC file, from its raw (plain or gzip-compressed) byte stream.

    A work unit passes the stream at its first record's offset, that record's number (`first`)
    and `stop`: the unit reads the records that start before `stop` (-1: the end of the file).
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    limit = getattr(ctx.cfg, "max_record_bytes", DEFAULT_MAX_RECORD_BYTES)
    extractor = getattr(ctx.cfg, "warc_extractor", WARC_EXTRACTOR)
    seekable = stream.seekable()
    if not seekable:
        stream = CountingReader(stream)  # FastWARC asks a stream where it starts
    start = stream.tell() if seekable else 0
    gzipped = _peek(stream, 2) == _GZIP_MAGIC[:2] if seekable else False
    if seekable and _is_arc(stream, gzipped):
        yield from _read_arc(stream, limit, extractor)
        return
    number = first  # of the next WARC record
    resume: int | None = start
    resumed = False  # this pass began at a record start found by scanning past a corrupt record
    while resume is not None:
        if seekable:
            stream.seek(resume)
        last_start: int | None = None
        current: int | None = None  # number of the record being extracted, while it is
        try:
            records = ArchiveIterator(stream, record_types=WarcRecordType.any_type, parse_http=True,
                                      auto_decode="all", quirks_mode=False)
            for record in records:
                if 0 <= stop <= record.stream_pos:
                    return  # the next unit's first record
                current, number, last_start = number, number + 1, record.stream_pos
                item = _record_item(record, current, limit, extractor)
                if item is not None:
                    yield item
                current = None
            return
        except OSError as exc:
            problem: Problem | None = None
            if current is not None:  # the record's header parsed, its payload did not
                problem = Problem("corrupt_record", f"WARC record {current} at offset {last_start}: {exc}", current)
                scan_from = last_start
            elif last_start is not None or not resumed:  # the next record's header did not parse
                problem = Problem("corrupt_record", f"WARC record {number} after offset {last_start or resume}: "
                                                    f"{exc}", number)
                number += 1
                scan_from = last_start if last_start is not None else resume
            else:  # the record this pass resumed at is the corrupt one found before
                scan_from = resume
            if not seekable:
                if problem is not None:
                    yield problem
                yield Problem("corrupt_record", f"records from {number} on not read: the stream cannot seek "
                                                "past a corrupt record", number)
                return
            resume = _next_record_start(stream, scan_from + 1, gzipped)
            if resume is None and number == 1 and not resumed:  # not one record in the file reads as WARC
                raise ReadError("corrupt", f"not a readable WARC file: {exc}") from exc
            if problem is not None:
                yield problem
            if resume is not None and 0 <= stop <= resume:
                return  # the next unit reads on from there
            resumed = True


def _record_item(record: Any, number: int, limit: int, extractor: str) -> Item | None:
    """One WARC record as a document or a problem; None for records that are not documents."""
    from fastwarc.warc import WarcRecordType

    if record.record_type != WarcRecordType.response:
        return None
    headers = record.headers
    url = headers.get("WARC-Target-URI")
    meta: dict[str, Any] = {"url": url, "date": headers.get("WARC-Date"), "record_id": record.record_id}
    http = record.http_headers
    if http is not None:
        meta["status"] = status = http.status_code
        if status is not None and not 200 <= status < 300:
            return None  # redirects and error pages are not the site's content
    if record.content_length > limit:
        return Problem("too_large", f"WARC record {number} ({url}): {record.content_length} bytes "
                                    f"> max_record_bytes={limit}", number)
    payload = record.reader.read(limit + 1)  # decoded (gzip, chunked) payloads can outgrow the record
    if len(payload) > limit:
        return Problem("too_large", f"WARC record {number} ({url}): payload over "
                                    f"max_record_bytes={limit} once decoded", number)
    meta["content_type"] = (record.http_content_type or "").lower()
    return _payload_item(payload, record.http_charset, meta, number, extractor)


def _payload_item(payload: bytes, charset: str | None, meta: dict[str, Any], number: int, extractor: str) -> Item:
    """A response's payload as a document: HTML through the extractor, plain text decoded."""
    url, mime = meta["url"], meta["content_type"]
    try:
        if mime in _HTML_TYPES or (not mime and b"<html" in payload[:2048].lower()):
            text, title = html_to_text(payload, charset, extractor)
            if title:
                meta["title"] = title
        elif mime in _TEXT_TYPES:
            text, _ = decode_text(payload, declared=charset)
        else:
            return Problem("unsupported_format", f"WARC record {number} ({url}): content type "
                                                 f"{mime or 'unknown'!r} is not HTML or text", number)
    except ReadError as exc:
        return Problem(exc.reason, f"WARC record {number} ({url}): {exc.message}", number)
    except Exception as exc:  # an extractor failing on one hostile page must not end the file
        return Problem("extract_error", f"WARC record {number} ({url}): {type(exc).__name__}: {exc}", number)
    if not text.strip():
        return Problem("no_text", f"WARC record {number} ({url}): no main text", number)
    return Doc(text, "warc", len(payload), meta, number)


def _is_arc(stream: BinaryIO, gzipped: bool) -> bool:
    """Whether the file is in the older ARC format (a `filedesc://` header), which FastWARC does not read."""
    head = _peek(stream, 512)
    if gzipped:
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 16)
        except zlib.error:
            return False
    return head.startswith(b"filedesc://")


def _read_arc(stream: BinaryIO, limit: int, extractor: str) -> Iterator[Item]:
    """ARC files through warcio, which presents their records as WARC responses; an error ends the file."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    count = 0  # records seen
    try:
        for record in ArchiveIterator(stream, arc2warc=True):
            number, count = count, count + 1
            if record.rec_type != "response":
                continue
            url = record.rec_headers.get_header("WARC-Target-URI")
            # no record_id: ARC has none, and the one warcio makes up is random
            meta: dict[str, Any] = {"url": url, "date": record.rec_headers.get_header("WARC-Date")}
            ctype = ""
            if record.http_headers is not None:
                meta["status"] = status = int(record.http_headers.get_statuscode() or 0)
                if status and not 200 <= status < 300:
                    continue
                ctype = record.http_headers.get_header("Content-Type") or ""
            meta["content_type"] = ctype.split(";")[0].strip().lower()
            charset = m.group(1) if (m := _CHARSET.search(ctype)) else None
            payload = record.content_stream().read(limit + 1)
            if len(payload) > limit:
                yield Problem("too_large", f"ARC record {number} ({url}): over max_record_bytes={limit}",
                              number)
                continue
            yield _payload_item(payload, charset, meta, number, extractor)
    except (ArchiveLoadFailed, EOFError, zlib.error, ValueError, OSError) as exc:
        yield Problem("corrupt_record", f"ARC records from {max(count - 1, 0)} on not read: {exc}", count)


def _peek(stream: BinaryIO, n: int) -> bytes:
    at = stream.tell()
    head = stream.read(n)
    stream.seek(at)
    return head


def _next_record_start(stream: BinaryIO, offset: int, gzipped: bool) -> int | None:
    """Offset of the first plausible WARC record start at or after `offset`, None at the end."""
    stream.seek(offset)
    base, buf = offset, b""
    while True:
        chunk = stream.read(_SCAN_CHUNK)
        at_end = not chunk
        buf += chunk
        checkable = len(buf) if at_end else len(buf) - _SCAN_TAIL
        if gzipped:
            i = buf.find(_GZIP_MAGIC)
            while 0 <= i < checkable:
                if _opens_warc_member(buf[i:i + _SCAN_TAIL]):
                    return base + i
                i = buf.find(_GZIP_MAGIC, i + 1)
        elif (m := _WARC_LINE.search(buf, 0, checkable + 1)) is not None and m.start() < checkable:
            return base + m.start() + 1
        if at_end:
            return None
        keep = max(0, checkable)
        base, buf = base + keep, buf[keep:]


def opens_record(stream: BinaryIO, offset: int, gzipped: bool) -> bool:
    """Whether a WARC record starts at `offset`: a gzip member opening with a WARC header, or a WARC line."""
    stream.seek(offset)
    head = stream.read(_SCAN_TAIL)
    return _opens_warc_member(head) if gzipped else head.startswith(b"WARC/1.")


def _opens_warc_member(data: bytes) -> bool:
    """Whether a gzip member starting here decompresses to a WARC header."""
    try:
        return zlib.decompressobj(wbits=31).decompress(data, 16).startswith(b"WARC/")
    except zlib.error:
        return False


def read_warc(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """The registered bytes reader: a whole file already in memory."""
    return read_warc_stream(name, io.BytesIO(data), ctx)


WARC = Format("warc", read_warc, extensions={".warc", ".arc"})
