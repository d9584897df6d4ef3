"""JSON Lines (one record per line) and JSON (an array of records, or one record).

The text is each record's `text_field` (unset: the first of `text`, `content`, `raw_content`
it holds); `meta_fields` (unset: the record's other short scalar fields) go into `meta`.
JSON Lines is read as a stream, line by line, so memory is bounded by a record, not the file;
a bad line (invalid JSON, no text, over `max_record_bytes`) is quarantined by its number and
the rest are kept. A `.json` array is parsed whole, under the single-file limits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

import orjson
import pyarrow as pa

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError, Rows
from refinery.tasks.ingest.config import META_VALUE_CHARS, TEXT_FIELD_CANDIDATES
from refinery.tasks.ingest.formats.text import SAMPLE_BYTES

_META_SCALARS = (str, int, float, bool)
BLOCK_RECORDS = 2048  # valid records gathered into one `Rows` block
BLOCK_BYTES = 16 * 2**20  # or this much text, whichever comes first
_SKIP = 1 << 20


def _field_of(record: dict[str, Any], ctx: Context, kind: str) -> str | None:
    wanted = ctx.cfg.text_field_for(kind)
    if wanted is not None:
        return wanted
    return next((k for k in TEXT_FIELD_CANDIDATES if k in record), None)


def record_meta(record: dict[str, Any], field_name: str, ctx: Context) -> dict[str, Any]:
    """The fields of a record that go into `meta`: `meta_fields`, else its short scalar fields."""
    fields = ctx.cfg.meta_fields
    if fields is not None:
        return {k: record[k] for k in fields if k in record and k != field_name}
    return {k: v for k, v in record.items()
            if k != field_name and isinstance(v, _META_SCALARS) and len(str(v)) <= META_VALUE_CHARS}


def _check(record: Any, ctx: Context, kind: str, pos: int, where: str) -> tuple[str, str] | Problem:
    """(text field, text) of a record, or the Problem that keeps it out."""
    if not isinstance(record, dict):
        return Problem("missing_text_field", f"{where}: a {type(record).__name__}, not an object", pos)
    field_name = _field_of(record, ctx, kind)
    if field_name is None:
        return Problem("missing_text_field",
                       f"{where}: none of the fields {', '.join(TEXT_FIELD_CANDIDATES)} "
                       f"(fields: {', '.join(map(str, record)) or 'none'}); set ingest.text_field", pos)
    text = record.get(field_name)
    if not isinstance(text, str):
        why = "missing" if text is None else f"a {type(text).__name__}, not a string"
        return Problem("missing_text_field",
                       f"{where}: field {field_name!r} is {why} (fields: {', '.join(map(str, record))});"
                       " set ingest.text_field", pos)
    if not text.strip():
        return Problem("no_text", f"{where}: field {field_name!r} is empty", pos)
    return field_name, text


def _record_doc(record: Any, ctx: Context, fmt: str, nbytes: int, pos: int, where: str) -> Item:
    checked = _check(record, ctx, "json", pos, where)
    if isinstance(checked, Problem):
        return checked
    field_name, text = checked
    return Doc(text, fmt, nbytes, record_meta(record, field_name, ctx), pos)


def _clean(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates from `\ud800` escapes: Arrow needs valid UTF-8
        return text.encode("utf-8", "replace").decode("utf-8")


def _meta_json(meta: dict[str, Any]) -> str:
    try:
        return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS, default=str).decode()
    except TypeError:  # lone surrogates, integers past 64 bits: the standard library copes
        return json.dumps(meta, sort_keys=True, default=str, ensure_ascii=True)


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)  # what orjson refuses but JSON allows (lone surrogate escapes); else raises


def stream_jsonl(stream: BinaryIO, ctx: Context, first: int = 0) -> Iterator[Item | Rows]:
    """Records of a JSON Lines stream; `first` is the 0-based line number of its first line.

    Valid records come in `Rows` blocks, problems one by one. `#n` (`pos`) is the line index
    in the file, whichever unit of it this stream is.
    """
    limit = ctx.cfg.max_record_bytes
    lineno = first
    texts: list[str] = []
    pos: list[int] = []
    metas: list[str] = []
    sizes: list[int] = []
    size = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            break
        n = lineno
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):  # skip the rest of an oversize record
            nbytes = len(line)
            while (more := stream.readline(_SKIP)) and not more.endswith(b"\n"):
                nbytes += len(more)
            nbytes += len(more)
            yield Problem("too_large", f"line {n + 1}: {nbytes} bytes is over max_record_bytes={limit}", n)
            continue
        if not line.strip():
            continue
        try:
            record = _loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Problem("invalid_json", f"line {n + 1}: {exc}", n)
            continue
        checked = _check(record, ctx, "jsonl", n, f"line {n + 1}")
        if isinstance(checked, Problem):
            yield checked
            continue
        field_name, text = checked
        meta = record_meta(record, field_name, ctx)
        meta["line"] = n + 1
        texts.append(_clean(text))
        pos.append(n)
        metas.append(_meta_json(meta))
        sizes.append(len(line.rstrip(b"\r\n")))
        size += len(line)
        if len(texts) >= BLOCK_RECORDS or size >= BLOCK_BYTES:
            yield Rows(pa.array(texts, pa.large_string()), pos, metas, "jsonl", sizes)
            texts, pos, metas, sizes, size = [], [], [], [], 0
    if texts:
        yield Rows(pa.array(texts, pa.large_string()), pos, metas, "jsonl", sizes)


def read_jsonl(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """JSON Lines held in memory (an archive member): the streaming reader over its bytes."""
    import io

    for item in stream_jsonl(io.BytesIO(data), ctx):
        if isinstance(item, Rows):
            yield from item.docs()
        else:
            yield item


def read_json(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """A JSON array of records (or one record), parsed whole under the single-file limits."""
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
