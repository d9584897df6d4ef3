"""PPTX: slide text top-to-bottom, left-to-right (tables and groups included), then speaker notes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Format, Item, text_doc
from refinery.tasks.ingest.formats._office import partitioned, read_office


def _pptx_direct(data: bytes) -> tuple[str, dict[str, Any]]:
    """Slides in order with python-pptx; the first title placeholder is the title."""
    from pptx import Presentation

    prs = Presentation(io.BytesIO(data))
    blocks: list[str] = []
    title = None
    nslides = 0
    for slide in prs.slides:
        nslides += 1
        shapes = sorted(_walk_shapes(slide.shapes), key=lambda s: (s.top or 0, s.left or 0))
        for shape in shapes:
            if shape.has_text_frame:
                text = "\n".join(p.text.strip() for p in shape.text_frame.paragraphs if p.text.strip())
                if text and title is None and shape.is_placeholder and "TITLE" in str(shape.placeholder_format.type):
                    title = text
            elif getattr(shape, "has_table", False) and shape.has_table:
                text = "\n".join("\t".join(c.text.strip() for c in row.cells) for row in shape.table.rows)
            else:
                continue
            if text.strip():
                blocks.append(text.strip())
        if slide.has_notes_slide and (notes := slide.notes_slide.notes_text_frame) is not None:
            if notes.text.strip():
                blocks.append(notes.text.strip())
    meta: dict[str, Any] = {"slides": nslides}
    if title:
        meta["title"] = title
    return "\n\n".join(blocks), meta


def _walk_shapes(shapes: Any) -> Iterator[Any]:
    for shape in shapes:
        if shape.shape_type is not None and int(shape.shape_type) == 6:  # MSO_SHAPE_TYPE.GROUP
            yield from _walk_shapes(shape.shapes)
        else:
            yield shape


def _pptx_unstructured(data: bytes) -> tuple[str, dict[str, Any]]:
    from refinery.tasks.ingest.offline_nlp import use_offline_nlp

    use_offline_nlp()
    from unstructured.partition.pptx import partition_pptx

    elements = partition_pptx(file=io.BytesIO(data))
    text, meta = partitioned(elements)
    pages = {getattr(e.metadata, "page_number", None) for e in elements}
    meta["slides"] = len({p for p in pages if p is not None})
    return text, meta


def read_pptx(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, meta = read_office(data, "pptx", ctx, _pptx_direct, _pptx_unstructured)
    yield text_doc(text, "pptx", len(data), meta, "PPTX")


PPTX = Format("pptx", read_pptx, extensions={".pptx"})
