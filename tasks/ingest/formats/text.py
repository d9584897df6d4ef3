"""Plain text, and the text decoding every text-based format shares.

Decoding is all there is to do for plain text: BOMs first, then strict UTF-8, then
charset-normalizer's best guess; NUL or control bytes mean it is not text at all.
`read_unknown` is the fallback for files no format claims: text if it decodes.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

from refinery.tasks.ingest.base import Context, Format, Item, ReadError, split_name, text_doc

_BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
]
_CONTROL = bytes(range(0, 9)) + bytes(range(14, 32))
SAMPLE_BYTES = 1 << 16  # how much of a file the encoding guess (and format heuristics) look at
_PREFERRED = ("cp1252", "latin_1", "iso8859_15", "cp1251", "gb18030", "shift_jis", "euc_kr", "big5")


def decode_text(data: bytes, declared: str | None = None) -> tuple[str, str]:
    """(text, encoding): BOMs first, then strict UTF-8, then charset-normalizer's best guess.

    Raises `ReadError("binary")` for data that is not text at all.
    """
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return data.decode(enc, errors="replace"), enc.replace("-sig", "")
    head = data[:SAMPLE_BYTES]
    if b"\x00" in head:
        # UTF-16 without a BOM shows a NUL in every other byte of ASCII text.
        for enc, zeros in (("utf-16-le", head[1::2]), ("utf-16-be", head[0::2])):
            if zeros.count(0) > 0.9 * len(zeros) and len(head) % 2 == 0:
                return data.decode(enc, errors="replace"), enc
        raise ReadError("binary", "binary data (NUL bytes) in a file read as text")
    if declared:
        try:
            return data.decode(declared), declared.lower()
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    if sum(head.count(c) for c in _CONTROL) > 0.05 * len(head):
        raise ReadError("binary", "binary data (control bytes) in a file read as text")
    from charset_normalizer import from_bytes

    matches = from_bytes(head if len(data) > SAMPLE_BYTES else data)
    best = matches.best()
    if best is not None:
        # Short samples often tie between code pages; prefer the most common one among equals.
        ties = {m.encoding for m in matches if m.chaos == best.chaos and m.coherence == best.coherence}
        best_encoding = next((e for e in _PREFERRED if e in ties), best.encoding)
    if best is None:
        bad = data.decode("utf-8", errors="replace").count("\ufffd")
        if bad <= 0.01 * len(data):
            return data.decode("utf-8", errors="replace"), "utf-8 (with replacements)"
        raise ReadError("undecodable", "no text encoding fits these bytes")
    return data.decode(best_encoding, errors="replace"), best_encoding


def read_text(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, enc = decode_text(data)
    yield text_doc(text, "text", len(data), {"encoding": enc}, "text file")


def read_unknown(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Unknown extension: ingest it as text when it decodes as text, else say so."""
    try:
        text, enc = decode_text(data)
    except ReadError as exc:
        _, ext = split_name(name)
        raise ReadError("unsupported_format", f"unknown file type {ext or '(no extension)'!r}: {exc.message}") from exc
    yield text_doc(text, "text", len(data), {"encoding": enc}, "file")


TEXT = Format(
    "text", read_text,
    extensions={".txt", ".text", ".log", ".rst", ".org", ".adoc", ".srt", ".vtt", ""},
)
