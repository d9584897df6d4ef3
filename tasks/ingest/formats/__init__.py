"""Every input format, registered in one list; detection and dispatch both derive from it.

A format is one module here declaring a `Format`: the extensions (and whole file names)
it claims, optionally a `sniff` of the first bytes for files no name claims, and its
reader. Adding a format is that module plus one line in `FORMATS`. Code outside the
package (a test, a plugin) adds one with `register_format(fmt)`, or for a scope with
`with registered(fmt): ...`. The registry is per process: parsing in worker processes
sees what their own import of this package registers.

`read_blob(name, data, ctx)` peels compression suffixes, picks the format and yields its
`Doc`s and `Problem`s; a file no format claims is read as text if it decodes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from refinery.tasks.ingest.base import SNIFF_BYTES, Context, Format, Item, ReadError, split_name
from refinery.tasks.ingest.compression import peel
from refinery.tasks.ingest.formats.archives import TAR, ZIP
from refinery.tasks.ingest.formats.code import CODE
from refinery.tasks.ingest.formats.docx import DOCX
from refinery.tasks.ingest.formats.email import EMAIL
from refinery.tasks.ingest.formats.html import HTML, html_to_text
from refinery.tasks.ingest.formats.image import IMAGE, ocr_status
from refinery.tasks.ingest.formats.jsonl import JSON, JSONL
from refinery.tasks.ingest.formats.markdown import MARKDOWN
from refinery.tasks.ingest.formats.parquet import ARROW, PARQUET
from refinery.tasks.ingest.formats.pdf import PDF
from refinery.tasks.ingest.formats.pptx import PPTX
from refinery.tasks.ingest.formats.tabular import CSV
from refinery.tasks.ingest.formats.text import TEXT, decode_text, read_unknown
from refinery.tasks.ingest.formats.warc import WARC

FORMATS: list[Format] = [
    TEXT,
    CODE,
    MARKDOWN,
    HTML,
    PDF,
    DOCX,
    PPTX,
    EMAIL,
    IMAGE,
    JSONL,
    JSON,
    PARQUET,
    ARROW,
    CSV,
    WARC,
    ZIP,
    TAR,
]

UNKNOWN = "unknown"  # the kind of a file no format claims by name


@dataclass(frozen=True)
class _Index:
    by_filename: dict[str, Format]
    by_extension: dict[str, Format]
    sniffers: tuple[Format, ...]


@functools.lru_cache(maxsize=8)
def _index(formats: tuple[Format, ...]) -> _Index:
    """Lookup tables of a list of formats; two formats claiming one name is an error, not an order."""
    names: set[str] = set()
    by_filename: dict[str, Format] = {}
    by_extension: dict[str, Format] = {}
    for fmt in formats:
        if fmt.name in names or fmt.name == UNKNOWN:
            raise ValueError(f"format name {fmt.name!r} is taken")
        names.add(fmt.name)
        for table, keys, what in ((by_filename, fmt.filenames, "file name"), (by_extension, fmt.extensions, "extension")):
            for key in keys:
                if key in table:
                    raise ValueError(f"format {fmt.name!r} claims {what} {key!r}, already {table[key].name!r}'s")
                table[key] = fmt
    return _Index(by_filename, by_extension, tuple(f for f in formats if f.sniff is not None))


def format_for(name: str, data: bytes = b"") -> Format | None:
    """The format that reads a (decompressed) file: by base name, extension, then a sniff of `data`."""
    index = _index(tuple(FORMATS))
    base, ext = split_name(name)
    fmt = index.by_filename.get(base) or index.by_extension.get(ext)
    if fmt is None and data and index.sniffers:
        head = data[:SNIFF_BYTES]
        fmt = next((f for f in index.sniffers if f.sniff is not None and f.sniff(head)), None)
    return fmt


def detect(name: str, data: bytes = b"") -> str:
    """The kind (format name) of a file, `unknown` when no format claims it."""
    fmt = format_for(name, data)
    return fmt.name if fmt is not None else UNKNOWN


def read_blob(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Documents and problems in one file's bytes; `name` (then its content) picks the reader."""
    if not data:
        raise ReadError("empty", "zero-byte file")
    peeled = peel(name, data, ctx)
    if peeled is not None:
        yield from read_blob(*peeled, ctx)
        return
    fmt = format_for(name, data)
    yield from (fmt.reader if fmt is not None else read_unknown)(name, data, ctx)


def register_format(fmt: Format) -> None:
    """Add a format to this process's registry; ValueError if its name or a claimed name is taken."""
    _index((*FORMATS, fmt))
    FORMATS.append(fmt)


def unregister_format(fmt: Format) -> None:
    """Take a format out of this process's registry."""
    FORMATS.remove(fmt)


@contextlib.contextmanager
def registered(*formats: Format) -> Iterator[None]:
    """Formats registered for the `with` block only (tests, one-off runs)."""
    added: list[Format] = []
    try:
        for fmt in formats:
            register_format(fmt)
            added.append(fmt)
        yield
    finally:
        for fmt in added:
            unregister_format(fmt)


__all__ = [
    "FORMATS",
    "UNKNOWN",
    "Format",
    "decode_text",
    "detect",
    "format_for",
    "html_to_text",
    "ocr_status",
    "read_blob",
    "register_format",
    "registered",
    "unregister_format",
]
