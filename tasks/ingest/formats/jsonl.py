"""JSON Lines (one record per line) and JSON (an array of records, or one record).

The text is the `jsonl_text_field` of each record; the record's other short scalar
fields go into `meta`. A bad line is quarantined by its number and the rest are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError
from refinery.tasks.ingest.formats.text import SAMPLE_BYTES

_META_SCALARS = (str, int, float, bool)


def _record_doc(record: Any, ctx: Context, fmt: str, nbytes: int, pos: int, where: str) -> Item:
    field_name = ctx.cfg.jsonl_text_field
    if not isinstance(record, dict):
        return Problem("missing_text_field", f"{where}: a {type(record).__name__}, not an object with {field_name!r}", pos)
    text = record.get(field_name)
    if not isinstance(text, str):
        why = "missing" if text is None else f"a {type(text).__name__}, not a string"
        return Problem("missing_text_field", f"{where}: field {field_name!r} is {why}; set jsonl_text_field", pos)
    if not text.strip():
        return Problem("no_text", f"{where}: field {field_name!r} is empty", pos)
    meta = {k: v for k, v in record.items()
            if k != field_name and isinstance(v, _META_SCALARS) and len(str(v)) <= 512}
    return Doc(text, fmt, nbytes, meta, pos)


def read_jsonl(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """One record per line; a bad line is quarantined by its number and the rest are kept."""
    start = 0
    lineno = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        line = data[start:end]
        start = end + 1
        lineno += 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Problem("invalid_json", f"line {lineno}: {exc}", lineno - 1)
            continue
        item = _record_doc(record, ctx, "jsonl", len(line), lineno - 1, f"line {lineno}")
        if isinstance(item, Doc):
            item.meta["line"] = lineno
        yield item


def read_json(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """A JSON array of records (or one record)."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if b"\n{" in data[:SAMPLE_BYTES]:  # JSON Lines saved as .json
            yield from read_jsonl(name, data, ctx)
            return
        raise ReadError("invalid_json", f"not valid JSON: {exc}") from exc
    records = value if isinstance(value, list) else [value]
    for i, record in enumerate(records):
        nbytes = len(json.dumps(record, ensure_ascii=False).encode("utf-8")) if len(records) > 1 else len(data)
        yield _record_doc(record, ctx, "jsonl", nbytes, i, f"element {i}")


JSONL = Format("jsonl", read_jsonl, extensions={".jsonl", ".ndjson", ".jsonlines"})
JSON = Format("json", read_json, extensions={".json"})
