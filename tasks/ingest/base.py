"""The reader contract: what a format declares, what its reader yields, and the budget it reads under.

A `Format` names the files it claims (extensions, whole file names, optionally a
look at the first bytes) and the reader that turns one file's bytes into `Doc`s
and `Problem`s. Every format module declares its `Format`s with these types and
nothing else from the registry, so a format can be written, and tested, on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from refinery.tasks.ingest.config import TEXT_FIELD_CANDIDATES, IngestConfig


@dataclass
class Doc:
    """One document: `pos` is its record number inside a container (`#n` in the source), else None."""

    text: str
    format: str
    nbytes: int
    meta: dict[str, Any] = field(default_factory=dict)
    pos: int | None = None


@dataclass
class Problem:
    """One record that could not be read; becomes a quarantine row with `reason`."""

    reason: str
    error: str
    pos: int | None = None


@dataclass
class Rows:
    """A block of records of a columnar dataset (Parquet, Arrow, CSV), kept as columns.

    The fast path for tables: the text stays an Arrow array from reader to writer instead of
    becoming one `Doc` per row. Only valid records are here (bad ones are `Problem`s);
    `pos` are their record numbers and `meta` their `meta` JSON strings.
    """

    text: Any  # pyarrow string or large_string array, no nulls
    pos: list[int]
    meta: list[str]
    format: str
    nbytes: list[int] | None = None  # raw size of each record; None: the UTF-8 size of its text

    def docs(self) -> Iterator[Doc]:
        """The same records as `Doc`s, for callers that take one at a time (archive members)."""
        import json

        sizes = self.nbytes or [None] * len(self.pos)
        for text, pos, meta, n in zip(self.text.to_pylist(), self.pos, self.meta, sizes, strict=True):
            yield Doc(text, self.format, n if n is not None else len(text.encode("utf-8")), json.loads(meta), pos)


Item = Doc | Problem


class ReadError(Exception):
    """A whole file (or archive member) can't be read; `reason` is the quarantine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Context:
    """Per-file settings and budgets shared by nested readers (archive members)."""

    cfg: IngestConfig
    deadline: float
    decompressed: int = 0  # bytes produced by decompression so far, against max_decompressed_bytes
    depth: int = 0  # archives entered so far: members of a zip inside a tar read at depth 2

    def remaining_s(self) -> float:
        return max(0.01, self.deadline - time.monotonic())

    def charge(self, n: int) -> None:
        self.decompressed += n
        if self.decompressed > self.cfg.max_decompressed_bytes:
            raise ReadError(
                "decompression_limit",
                f"expands past max_decompressed_bytes={self.cfg.max_decompressed_bytes} "
                "(a zip bomb, or raise the limit for a genuinely large archive)",
            )


Reader = Callable[[str, bytes, Context], Iterator[Item]]
"""`reader(name, data, ctx)`: a file's name (for its extension), its raw bytes, the per-file context."""


@dataclass(frozen=True, eq=False)
class Format:
    """One input format: which files it claims and the reader that parses them.

    `name` is the file's `kind` in the file index. A file is claimed by its lower-cased
    base name (`filenames`, e.g. `makefile`), else by its extension (`extensions`, with the
    dot; `""` means no extension); a file no format claims by name goes to the first
    format whose `sniff(head)` accepts its first bytes (`SNIFF_BYTES`), else it is read as
    text if it decodes. Compression suffixes (`.gz`, `.zst`, ...) are peeled before any of this.
    """

    name: str
    reader: Reader
    extensions: Iterable[str] = frozenset()
    filenames: Iterable[str] = frozenset()
    sniff: Callable[[bytes], bool] | None = None

    def __post_init__(self) -> None:
        exts = frozenset(e.lower() for e in self.extensions)
        bad = sorted(e for e in exts if e and (not e.startswith(".") or e.count(".") > 1))
        if bad:
            raise ValueError(f"format {self.name!r}: extensions are one '.suffix' each (or ''), not {bad}")
        object.__setattr__(self, "extensions", exts)
        object.__setattr__(self, "filenames", frozenset(n.lower() for n in self.filenames))


SNIFF_BYTES = 4096  # what `Format.sniff` sees of a file


def split_name(name: str) -> tuple[str, str]:
    """(lower-cased base name, extension) of the last path component."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    dot = base.rfind(".")
    return base, (base[dot:] if dot > 0 else "")


def text_field(names: Iterable[str], cfg: IngestConfig, kind: str, what: str) -> str:
    """The column holding the text: the configured one, else the first of TEXT_FIELD_CANDIDATES present.

    Raises `missing_text_column` naming the columns found, so the fix is one setting away.
    """
    names = list(names)
    wanted = cfg.text_field_for(kind)
    if wanted is not None:
        if wanted in names:
            return wanted
        raise ReadError("missing_text_column",
                        f"{what} has no column {wanted!r} (columns: {', '.join(names) or 'none'}); set ingest.text_field")
    found = next((c for c in TEXT_FIELD_CANDIDATES if c in names), None)
    if found is None:
        raise ReadError("missing_text_column",
                        f"{what} has none of the columns {', '.join(TEXT_FIELD_CANDIDATES)} "
                        f"(columns: {', '.join(names) or 'none'}); set ingest.text_field")
    return found


def text_doc(text: str, fmt: str, nbytes: int, meta: dict[str, Any], what: str) -> Doc:
    """A single-document format's result, or `no_text` when extraction left only whitespace."""
    if not text.strip():
        raise ReadError("no_text", f"{what} holds only whitespace")
    return Doc(text, fmt, nbytes, meta)
