"""JSON Lines (one record per line) and JSON (an array of records, or one record).

The text is each record's `text_field` (unset: the first of `text`, `content`, `raw_content`
it holds); `meta_fields` (unset: the record's other short scalar fields) go into `meta`.
JSON Lines is read as a stream, line by line, so memory is bounded by a record, not the file;
a bad line (invalid JSON, no text, over `max_record_bytes`) is quarantined by its number and
the rest are kept. A `.json` file holding an array of records is streamed the same way,
element by element (`#n` is the element's index), with the standard library's decoder over a
window of the text that holds one element at a time.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import orjson
import pyarrow as pa

from refinery.tasks.ingest.base import Context, Format, Item, Problem, ReadError, Rows
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


class _Block:
    """Valid records gathered into one `Rows` block: BLOCK_RECORDS of them, or BLOCK_BYTES of text."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.texts: list[str] = []
        self.pos: list[int] = []
        self.metas: list[str] = []
        self.sizes: list[int] = []
        self.size = 0

    def add(self, text: str, pos: int, meta: dict[str, Any], nbytes: int) -> bool:
        """Add one record; True when the block is full."""
        self.texts.append(text)
        self.pos.append(pos)
        self.metas.append(_meta_json(meta))
        self.sizes.append(nbytes)
        self.size += nbytes
        return len(self.texts) >= BLOCK_RECORDS or self.size >= BLOCK_BYTES

    def take(self) -> Rows | None:
        """The records gathered so far as one block (None when there are none), and a fresh start."""
        if not self.texts:
            return None
        try:
            text = pa.array(self.texts, pa.large_string())
        except UnicodeEncodeError:  # a lone surrogate somewhere (a `\ud800` escape): clean them all
            text = pa.array([_clean(t) for t in self.texts], pa.large_string())
        rows = Rows(text, self.pos, self.metas, self.fmt, self.sizes)
        self.__init__(self.fmt)  # type: ignore[misc]
        return rows


def stream_jsonl(stream: BinaryIO, ctx: Context, first: int = 0) -> Iterator[Item | Rows]:
    """Records of a JSON Lines stream; `first` is the 0-based line number of its first line.

    Valid records come in `Rows` blocks, problems one by one. `#n` (`pos`) is the line index
    in the file, whichever unit of it this stream is. When the stream breaks part-way (a cut
    gzip or zstd stream) the records read before the break are yielded, then the error raised.
    """
    limit = ctx.cfg.max_record_bytes
    lineno = first
    block = _Block("jsonl")
    try:
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
                yield Problem("too_large", f"line {n + 1}: {nbytes} bytes is over max_record_bytes={limit}",
                              n)
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
            if block.add(text, n, meta, len(line.rstrip(b"\r\n"))) and (rows := block.take()) is not None:
                yield rows
    except ReadError:
        if (rows := block.take()) is not None:  # what was read before the break is kept
            yield rows
        raise
    if (rows := block.take()) is not None:
        yield rows


def _items(streamed: Iterator[Item | Rows]) -> Iterator[Item]:
    """A streaming reader's blocks as single items, for bytes held in memory (an archive member)."""
    for item in streamed:
        if isinstance(item, Rows):
            yield from item.docs()
        else:
            yield item


def read_jsonl(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """JSON Lines held in memory (an archive member): the streaming reader over its bytes."""
    yield from _items(stream_jsonl(io.BytesIO(data), ctx))


# -- JSON: a top-level array streamed element by element ----------------------------------------

_READ_BYTES = 1 << 20  # read into the window at a time (more for an element bigger than the window)
_WS = re.compile(r"[ \t\r\n]*")
_STRUCTURE = re.compile(r'[\[\]{}",]')
_NEXT = re.compile(r"[ \t\r\n]*,[ \t\r\n]*")  # from the end of one element to the start of the next
_decode = json.JSONDecoder().raw_decode


class _Window:
    """The decoded text of a byte stream from the element being parsed on.

    Text before the current element is dropped at each read, so memory is bounded by the
    largest element (and `max_record_bytes`), never by the file. `head` keeps the raw bytes
    read while the file may still turn out to be JSON Lines saved as `.json`.
    """

    def __init__(self, stream: BinaryIO, head_limit: int) -> None:
        self.stream = stream
        first = stream.read(4)  # what json.detect_encoding looks at
        encoding = json.detect_encoding(first) if first else "utf-8"
        self.decoder = codecs.getincrementaldecoder(encoding)("replace")
        self.text = self.decoder.decode(first)
        self.eof = not first
        self.head: list[bytes] | None = [first]
        self.head_size = len(first)
        self.head_limit = head_limit

    def more(self, keep: int) -> None:
        """Drop the text before `keep` and read on: at least as much again as is kept, so a big element
        is parsed a logarithmic number of times, not once per read. Indices into `text` restart at `keep`."""
        if self.eof:
            self.text = self.text[keep:]
            return
        chunk = self.stream.read(max(_READ_BYTES, len(self.text) - keep))
        if self.head is not None:
            self.head.append(chunk)
            self.head_size += len(chunk)
            if self.head_size > self.head_limit:
                self.head = None
        self.eof = not chunk
        self.text = self.text[keep:] + self.decoder.decode(chunk, final=self.eof)

    def next_char(self, at: int) -> tuple[int, str, bool]:
        """(index, character) of the next non-blank character from `at` ("" at the end of the file), and
        whether a line break was passed. Reading more restarts indices at `at`."""
        newline = False
        while True:
            end = _WS.match(self.text, at).end()  # type: ignore[union-attr]
            newline = newline or "\n" in self.text[at:end]
            if end < len(self.text):
                return end, self.text[end], newline
            if self.eof:
                return end, "", newline
            self.more(end)
            at = 0

    def nbytes(self, start: int, end: int) -> int:
        """Raw (UTF-8) size of the text `[start, end)`."""
        if self.text.isascii():  # constant time: CPython flags ASCII-only strings
            return end - start
        return len(self.text[start:end].encode("utf-8", "surrogatepass"))


class _ValueEnd:
    """Where a JSON value ends, found without parsing it: brackets matched outside strings.

    Used only when a parse fails, to tell a bad element (its end is in the window: quarantine it,
    read on) from one the window cuts (read more); resumable, to skip an oversize element. A closing
    bracket of the wrong kind closes back to its match (`{"a": [1}` ends at the `}`), else the
    innermost bracket, so one bad element does not swallow the rest of the file.
    """

    def __init__(self, at: int) -> None:
        self.at = at  # where to go on from
        self.open = ""  # the brackets open, innermost last
        self.in_string = False

    def find(self, text: str) -> int:
        """Index just past the value, or -1 when `text` ends first (then `at` is where to go on)."""
        at = self.at
        try:
            while True:
                if self.in_string:
                    quote = text.find('"', at)
                    if quote < 0:
                        end = len(text)
                        while end > at and text[end - 1] == "\\":  # an escape cut by the window's end
                            end -= 1
                        at = end
                        return -1
                    escapes = quote
                    while escapes > at and text[escapes - 1] == "\\":
                        escapes -= 1
                    at = quote + 1
                    if (quote - escapes) % 2 == 0:  # not escaped: the string ends here
                        self.in_string = False
                        if not self.open:
                            return at
                    continue
                m = _STRUCTURE.search(text, at)
                if m is None:
                    at = len(text)
                    return -1
                c = m.group()
                if c == '"':
                    self.in_string, at = True, m.end()
                elif c in "[{":
                    self.open, at = self.open + c, m.end()
                elif c == ",":
                    at = m.end() if self.open else m.start()
                    if not self.open:  # the end of a bare value (a number, a misspelt literal)
                        return at
                else:
                    if not self.open:  # a bare value ends before it
                        at = m.start()
                        return at
                    match = self.open.rfind("[" if c == "]" else "{")
                    self.open, at = self.open[:match if match >= 0 else -1], m.end()
                    if not self.open:
                        return at
        finally:
            self.at = at


def _element(w: _Window, at: int, n: int, limit: int) -> tuple[Any, int, int]:
    """Element `n` of the file at `w.text[at]`: (value, its raw size, index after it), the value a
    `Problem` for an invalid or oversize element; index -1 when the file ends inside it."""
    while True:
        try:
            value, end = _decode(w.text, at)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            scan = _ValueEnd(at)
            end = scan.find(w.text)
            if end >= 0:
                return Problem("invalid_json", f"element {n}: {why}", n), w.nbytes(at, end), end
            if w.eof:
                return Problem("truncated", f"the file ends inside element {n} ({why})"), 0, -1
            if len(w.text) - at > limit:
                return _skip(w, scan, at, n, limit)
            w.more(at)
            at = 0
            continue
        if end == len(w.text) and not w.eof:  # a number at the window's end may go on
            w.more(at)
            at = 0
            continue
        size = w.nbytes(at, end)
        if size > limit:
            why = f"element {n}: {size} bytes is over max_record_bytes={limit}"
            return Problem("too_large", why, n), size, end
        return value, size, end


def _skip(w: _Window, scan: _ValueEnd, at: int, n: int, limit: int) -> tuple[Any, int, int]:
    """Pass over an element bigger than `max_record_bytes` from `at`, holding one window of it at a time."""
    passed = 0  # characters of it in earlier windows
    while True:
        passed += scan.at - at
        w.more(scan.at)
        scan.at = at = 0
        end = scan.find(w.text)
        if end >= 0:
            why = f"element {n}: {passed + end} characters, over max_record_bytes={limit}"
            return Problem("too_large", why, n), passed + end, end
        if w.eof:
            why = f"the file ends inside element {n} (over max_record_bytes={limit})"
            return Problem("truncated", why), 0, -1


def _json_values(w: _Window, ctx: Context) -> Iterator[tuple[int, Any, int] | Problem | _Window]:
    """(number, value, raw size) of each record, Problems, or the window itself when the file turns out
    to be JSON Lines saved as `.json` (then the caller reads it as such)."""
    limit = ctx.cfg.max_record_bytes
    at, c, _ = w.next_char(0)
    if not c:
        raise ReadError("invalid_json", "not valid JSON: the file holds only white space")
    if c != "[":  # one value: a record, or JSON Lines saved as .json
        value, size, end = _element(w, at, 0, limit)
        why = value.error if isinstance(value, Problem) else "more data after the top-level value"
        if end >= 0:
            at, c, _ = w.next_char(end)
            if not c and not (isinstance(value, Problem) and value.reason == "invalid_json"):
                yield value if isinstance(value, Problem) else (0, value, size)
                return
        if w.head is not None and b"\n{" in b"".join(w.head)[:SAMPLE_BYTES]:
            yield w  # what json.loads refuses and has lines of objects: JSON Lines
            return
        raise ReadError("invalid_json", f"not valid JSON: {why}")
    w.head = None
    at, c, _ = w.next_char(at + 1)
    n = 0
    while c != "]":
        if not c:
            yield Problem("truncated", f"the file ends before element {n}, inside the array")
            return
        value, size, end = _element(w, at, n, limit)
        if end < 0:
            yield value
            return
        yield value if isinstance(value, Problem) else (n, value, size)
        n += 1
        m = _NEXT.match(w.text, end)  # the common `, ` in one step
        if m is not None and m.end() < len(w.text):
            at, c = m.end(), w.text[m.end()]
            if c != "]":
                continue
            break  # a trailing comma: nothing is lost, so no row for it
        at, c, _ = w.next_char(end)
        if c == ",":
            at, c, _ = w.next_char(at + 1)
            if c == "]":
                break  # a trailing comma: nothing is lost, so no row for it
        elif c and c != "]":
            yield Problem("invalid_json", f"after element {n - 1}: expected ',' or ']', found {c!r}; "
                                          "the rest of the file is not read")
            return
    at, c, _ = w.next_char(at + 1)
    if c:
        yield Problem("invalid_json", f"data after the array's closing bracket (after {n} elements) not read")


class _Prefixed(io.RawIOBase):
    """`prefix`, then the rest of `stream`: a stream read again from its start, without seeking."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self.prefix = memoryview(prefix)
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)


def stream_json(stream: BinaryIO, ctx: Context) -> Iterator[Item | Rows]:
    """Records of a `.json` file: each element of a top-level array (`#n` its index), or its one value.

    Streamed: memory is bounded by one element, not the file. An element that is not valid JSON,
    not a record or over `max_record_bytes` is a `Problem` with its number, and the rest goes on;
    a file broken part-way (cut, or not an array past some point) keeps what was read and adds one
    row. A file of several objects on their own lines is JSON Lines saved as `.json`, read as such.
    """
    w = _Window(stream, head_limit=ctx.cfg.max_record_bytes + 2 * _READ_BYTES)
    block = _Block("jsonl")
    try:
        for got in _json_values(w, ctx):
            if isinstance(got, _Window):
                assert got.head is not None
                again = io.BufferedReader(_Prefixed(b"".join(got.head), stream), _READ_BYTES)
                yield from stream_jsonl(again, ctx)
                return
            if isinstance(got, Problem):
                yield got
                continue
            n, record, size = got
            checked = _check(record, ctx, "json", n, f"element {n}")
            if isinstance(checked, Problem):
                yield checked
                continue
            field_name, text = checked
            full = block.add(text, n, record_meta(record, field_name, ctx), size)
            if full and (rows := block.take()) is not None:
                yield rows
    except ReadError:
        if (rows := block.take()) is not None:  # what was read before the break is kept
            yield rows
        raise
    if (rows := block.take()) is not None:
        yield rows


def read_json(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """A `.json` file held in memory (an archive member): the streaming reader over its bytes."""
    yield from _items(stream_json(io.BytesIO(data), ctx))


JSONL = Format("jsonl", read_jsonl, extensions={".jsonl", ".ndjson", ".jsonlines"})
JSON = Format("json", read_json, extensions={".json"})
