"""WARC: each HTTP response is a record; HTML is extracted, plain text decoded, others quarantined.

URL, date, status and content type go into `meta`.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError
from refinery.tasks.ingest.formats.html import html_to_text
from refinery.tasks.ingest.formats.text import decode_text

_CHARSET = re.compile(r"charset=([\w\-:.]+)", re.IGNORECASE)


def read_warc(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Each HTTP response is a record; HTML is extracted, plain text decoded, others quarantined."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    pos = 0
    try:
        for record in ArchiveIterator(io.BytesIO(data)):
            if record.rec_type != "response":
                continue
            url = record.rec_headers.get_header("WARC-Target-URI")
            date = record.rec_headers.get_header("WARC-Date")
            ctype = (record.http_headers.get_header("Content-Type") if record.http_headers else None) or ""
            payload = record.content_stream().read()
            meta: dict[str, Any] = {"url": url, "date": date, "content_type": ctype.split(";")[0].strip()}
            if record.http_headers is not None:
                meta["status"] = record.http_headers.get_statuscode()
            item = _warc_item(payload, ctype, meta, pos)
            pos += 1
            yield item
    except (ArchiveLoadFailed, EOFError, zlib.error, ValueError) as exc:
        raise ReadError("corrupt", f"unreadable WARC after {pos} responses: {exc}") from exc


def _warc_item(payload: bytes, ctype: str, meta: dict[str, Any], pos: int) -> Item:
    mime = meta["content_type"].lower()
    charset = m.group(1) if (m := _CHARSET.search(ctype)) else None
    try:
        if mime in ("text/html", "application/xhtml+xml") or (not mime and b"<html" in payload[:2048].lower()):
            text, title = html_to_text(payload, charset)
            if title:
                meta["title"] = title
        elif mime.startswith("text/"):
            text, _ = decode_text(payload, declared=charset)
        else:
            return Problem("unsupported_format", f"{meta['url']}: content type {mime or 'unknown'!r} is not text", pos)
    except ReadError as exc:
        return Problem(exc.reason, f"{meta['url']}: {exc.message}", pos)
    if not text.strip():
        return Problem("no_text", f"{meta['url']}: no visible text", pos)
    return Doc(text, "warc", len(payload), meta, pos)


WARC = Format("warc", read_warc, extensions={".warc", ".arc"})
