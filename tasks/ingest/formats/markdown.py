"""Markdown, kept as written: its markup is cheap, meaningful text for a language model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Format, Item, text_doc
from refinery.tasks.ingest.formats.text import decode_text

_MD_TITLE = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def read_markdown(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, enc = decode_text(data)
    meta: dict[str, Any] = {"encoding": enc}
    if m := _MD_TITLE.search(text[:20_000]):
        meta["title"] = m.group(1)
    yield text_doc(text, "markdown", len(data), meta, "Markdown file")


MARKDOWN = Format("markdown", read_markdown, extensions={".md", ".markdown", ".mdown", ".mkd", ".mdx"})
