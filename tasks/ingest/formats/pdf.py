"""PDF: the pypdf text layer (pdfminer.six when pypdf fails), Tesseract for pages without one.

The text layer is exact and fast; `unstructured[pdf]` would need a CUDA torch and a model download.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Doc, Format, Item, ReadError
from refinery.tasks.ingest.formats.image import run_tool, tesseract

logging.getLogger("pypdf").setLevel(logging.ERROR)
logging.getLogger("pdfminer").setLevel(logging.ERROR)


def read_pdf(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise ReadError("corrupt", "not a PDF (no %PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except Exception as exc:  # missing crypto backend, unknown algorithm
                raise ReadError("encrypted", f"encrypted PDF that can't be opened without a password: {exc}") from exc
            if not opened:
                raise ReadError("encrypted", "encrypted PDF: a password is needed to read it")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = None
        try:
            title = reader.metadata.title if reader.metadata else None
        except Exception:  # noqa: BLE001 (a broken info dictionary must not lose the text)
            title = None
        reader_name = "pypdf"
    except ReadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        pages, title, reader_name = _pdfminer_pages(data, exc), None, "pdfminer.six"
    meta: dict[str, Any] = {"pages": len(pages), "reader": reader_name}
    if title:
        meta["title"] = str(title)
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        text = _ocr_pdf(data, ctx, len(pages))
        meta["ocr"] = True
    yield Doc(text, "pdf", len(data), meta)


def _pdfminer_pages(data: bytes, first_error: Exception) -> list[str]:
    from pdfminer.high_level import extract_text

    try:
        text = extract_text(io.BytesIO(data))
    except Exception as exc:
        raise ReadError("corrupt", f"unreadable PDF: {first_error}; pdfminer: {exc}") from exc
    return text.split("\f")


def _ocr_pdf(data: bytes, ctx: Context, npages: int) -> str:
    """Render each page with poppler's pdftoppm and OCR it."""
    hint = ("install Tesseract and poppler (Debian/Ubuntu: apt-get install tesseract-ocr poppler-utils) "
            "and keep `ocr: true` to OCR it")
    if not ctx.cfg.ocr:
        raise ReadError("no_text_layer", "PDF has no text layer and ocr is off; set `ocr: true` to OCR it")
    if not shutil.which(ctx.cfg.tesseract_cmd) or not shutil.which("pdftoppm"):
        raise ReadError("no_text_layer", f"PDF has no text layer; {hint}")
    texts = []
    for page in range(1, max(npages, 1) + 1):
        png = run_tool(["pdftoppm", "-png", "-r", "200", "-f", str(page), "-l", str(page), "-"], data, ctx, "pdftoppm")
        texts.append(tesseract(png, ctx).strip())
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise ReadError("no_text", "PDF has no text layer and OCR found no text")
    return text


PDF = Format("pdf", read_pdf, extensions={".pdf"})
