"""DOCX: body paragraphs and tables in document order (headers and footers are boilerplate)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Format, Item, text_doc
from refinery.tasks.ingest.formats._office import partitioned, read_office


def _docx_direct(data: bytes) -> tuple[str, dict[str, Any]]:
    """Body paragraphs and tables in document order, with python-docx."""
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = docx.Document(io.BytesIO(data))
    blocks: list[str] = []
    title = document.core_properties.title or None
    for child in document.element.body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            para = Paragraph(child, document)
            text = para.text.strip()
            if text and title is None and para.style is not None and para.style.name in ("Title", "Heading 1"):
                title = text
        elif tag == "tbl":
            rows = Table(child, document).rows
            text = "\n".join("\t".join(_dedupe(c.text.strip() for c in row.cells)) for row in rows).strip()
        else:
            continue
        if text:
            blocks.append(text)
    return "\n\n".join(blocks), ({"title": title} if title else {})


def _dedupe(cells: Iterator[str]) -> list[str]:
    """Merged table cells repeat their text in python-docx; keep it once."""
    out: list[str] = []
    for c in cells:
        if not out or c != out[-1]:
            out.append(c)
    return out


def _docx_unstructured(data: bytes) -> tuple[str, dict[str, Any]]:
    from refinery.tasks.ingest.offline_nlp import use_offline_nlp

    use_offline_nlp()
    from unstructured.partition.docx import partition_docx

    return partitioned(partition_docx(file=io.BytesIO(data)))


def read_docx(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, meta = read_office(data, "docx", ctx, _docx_direct, _docx_unstructured)
    yield text_doc(text, "docx", len(data), meta, "DOCX")


DOCX = Format("docx", read_docx, extensions={".docx", ".docm"})
