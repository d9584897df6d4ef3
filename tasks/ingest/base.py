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

from refinery.tasks.ingest.config import IngestConfig


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


def text_doc(text: str, fmt: str, nbytes: int, meta: dict[str, Any], what: str) -> Doc:
    """A single-document format's result, or `no_text` when extraction left only whitespace."""
    if not text.strip():
        raise ReadError("no_text", f"{what} holds only whitespace")
    return Doc(text, fmt, nbytes, meta)
