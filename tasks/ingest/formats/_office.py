"""What the Office Open XML formats (DOCX, PPTX) share: the zip check and the two reader paths.

`office_reader: direct` reads with python-docx / python-pptx: the libraries unstructured wraps,
without its per-element classification, which costs most of its time. `office_reader:
unstructured` uses unstructured's partitioners (element model, slower), kept offline.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

from refinery.tasks.ingest.base import Context, ReadError

Extract = Callable[[bytes], tuple[str, dict[str, Any]]]


def check_zip(data: bytes, kind: str) -> None:
    """An Office file is a zip container: say so plainly when this one isn't, or is broken."""
    if not data.startswith(b"PK\x03\x04"):
        raise ReadError("corrupt", f"not a {kind.upper()} file: a {kind.upper()} is a zip container and this is not one")
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as exc:
        raise ReadError("corrupt", f"broken {kind.upper()} zip container: {exc}") from exc
    if bad is not None:
        raise ReadError("corrupt", f"broken {kind.upper()} zip container: bad CRC in {bad!r}")


def partitioned(elements: list[Any]) -> tuple[str, dict[str, Any]]:
    """(text, meta) of unstructured's elements: their texts, and the first `Title` as title."""
    texts = [e.text for e in elements if getattr(e, "text", "").strip()]
    meta: dict[str, Any] = {"reader": "unstructured"}
    titles = [e.text for e in elements if getattr(e, "category", "") == "Title" and e.text.strip()]
    if titles:
        meta["title"] = titles[0]
    return "\n\n".join(texts), meta


def read_office(data: bytes, kind: str, ctx: Context, direct: Extract, unstructured: Extract) -> tuple[str, dict[str, Any]]:
    """(text, meta) through the configured reader; any library error is `corrupt`."""
    check_zip(data, kind)
    try:
        if ctx.cfg.office_reader == "unstructured":
            return unstructured(data)
        return direct(data)
    except ReadError:
        raise
    except Exception as exc:  # python-docx/pptx raise KeyError, ValueError, lxml errors...
        raise ReadError("corrupt", f"unreadable {kind.upper()}: {type(exc).__name__}: {exc}") from exc
