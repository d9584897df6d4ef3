"""HTML to main text: the page's own content, without navigation, menus, footers or banners.

Three extractors, picked by `ingest.html_extractor`:
- `trafilatura` (the default): trafilatura as FineWeb ran it (`favor_precision`, no comments)
  but without its `deduplicate` option, whose cache is shared by every page a process reads:
  it made a page's text depend on the pages read before it, and on the held-out set it
  lowered F1 (one page lost its whole article). Duplicates across documents are the dedup
  stage's work. On 100 annotated news and blog pages (tests/data/html_heldout, measured by
  `python -m bench.html_extract`) it kept the most main text for the least boilerplate, at
  the lowest speed of the three;
- `resiliparse`: Resiliparse's `extract_plain_text(main_content=True)` (Dolma's choice):
  several times faster, with more menus and banners left in;
- `heuristic`: the earlier lxml rules (drop nav/footer/aside and boilerplate classes, keep
  `<main>`/`<article>`), kept for comparison.

Bytes are decoded here, the way a browser does it: a byte-order mark, then the charset the
HTTP header declared (WARC records), then the page's `<meta charset>`, then strict UTF-8,
then detection. The WARC reader uses `html_to_text` for its HTML responses too.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from typing import Any, Literal

from refinery.tasks.ingest.base import Context, Doc, Format, Item, ReadError
from refinery.tasks.ingest.formats.text import SAMPLE_BYTES, decode_text

Extractor = Literal["trafilatura", "resiliparse", "heuristic"]
EXTRACTORS: tuple[str, ...] = ("trafilatura", "resiliparse", "heuristic")
DEFAULT_EXTRACTOR: Extractor = "trafilatura"

_DROP_TAGS = ["script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "embed",
              "nav", "footer", "aside", "form", "button", "select", "dialog", "menu", "head"]
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6",
               "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "thead", "tbody", "blockquote", "pre",
               "br", "hr", "figure", "figcaption", "address", "details", "summary", "td", "th", "caption"}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_BOILERPLATE = re.compile(r"(^|[\s_-])(nav|navbar|menu|breadcrumbs?|sidebar|cookie|footer|share|social|advert|ads?)($|[\s_-])",
                          re.IGNORECASE)
_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def html_to_text(data: bytes, charset: str | None = None,
                 extractor: str = DEFAULT_EXTRACTOR) -> tuple[str, str | None]:
    """(main text, title) of an HTML page; `charset` is the one an HTTP header declared, if any."""
    markup = decode_html(data, charset)
    return markup_to_text(markup, extractor)


def markup_to_text(markup: str, extractor: str = DEFAULT_EXTRACTOR) -> tuple[str, str | None]:
    """(main text, title) of decoded HTML with the named extractor."""
    markup = _XML_DECL.sub("", markup, count=1)
    if not markup.strip():
        return "", None
    if extractor == "trafilatura":
        return _trafilatura_text(markup)
    if extractor == "resiliparse":
        return _resiliparse_text(markup)
    if extractor == "heuristic":
        return _heuristic_text(markup)
    raise ValueError(f"ingest.html_extractor must be one of {', '.join(EXTRACTORS)}, not {extractor!r}")


def decode_html(data: bytes, charset: str | None = None) -> str:
    """Markup of an HTML page: BOM, HTTP charset, `<meta charset>`, strict UTF-8, then detection.

    A declared charset that fails to decode the bytes is passed over (servers and pages
    often lie); ISO-8859-1 and ASCII labels mean Windows-1252, as in browsers. Raises
    `ReadError("binary")` for bytes that are not text at all.
    """
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    if data.startswith(_BOMS) or b"\x00" in data[:SAMPLE_BYTES]:
        return decode_text(data)[0]  # UTF-16/BOMs, and the `binary` verdict for NUL bytes
    meta = m.group(1).decode("ascii", "replace") if (m := _META_CHARSET.search(data[:4096])) else None
    for label in (charset, meta):
        encoding = _html5_encoding(label)
        if encoding is not None:
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return bytes_to_str(data, detect_encoding(data), errors="replace")


def _html5_encoding(label: str | None) -> str | None:
    """The Python codec a charset label means on the web, None for an unknown label."""
    from resiliparse.parse.encoding import map_encoding_to_html5

    if not label:
        return None
    label = label.strip().strip("\"'")
    try:
        codecs.lookup(label)
    except LookupError:
        return None
    return map_encoding_to_html5(label)


def _title(markup: str) -> str | None:
    m = _TITLE.search(markup, 0, 1 << 16)
    if m is None:
        return None
    import html

    title = " ".join(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).split())
    return title or None


def _trafilatura_text(markup: str) -> tuple[str, str | None]:
    """FineWeb's precision settings, without `deduplicate`, so one page's text never depends on others."""
    import trafilatura

    text = trafilatura.extract(markup, favor_precision=True, include_comments=False)
    return text or "", _title(markup)


def _resiliparse_text(markup: str) -> tuple[str, str | None]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(markup)
    title = " ".join((tree.title or "").split()) or None
    return extract_plain_text(tree, main_content=True), title


def _heuristic_text(markup: str) -> tuple[str, str | None]:
    """The earlier rules: drop scripts, nav, footers, asides and boilerplate classes, keep main/article."""
    import lxml.html
    from lxml import etree

    try:
        root = lxml.html.document_fromstring(markup)
    except (etree.ParserError, ValueError):
        return "", None
    title_el = root.find(".//title")
    title = " ".join(title_el.text_content().split()) if title_el is not None else None
    etree.strip_elements(root, etree.Comment, etree.ProcessingInstruction, with_tail=False)
    for el in list(root.iter(*_DROP_TAGS)):
        el.drop_tree()
    for el in list(root.iter("header")):  # a site banner, unless it heads the article itself
        if not any(a.tag in ("main", "article") for a in el.iterancestors()):
            el.drop_tree()
    total = len(root.text_content())
    for el in list(root.iter()):
        if not isinstance(el.tag, str) or el.tag in ("body", "html", "main", "article") or el.getparent() is None:
            continue
        attrs = el.attrib
        if "hidden" in attrs or attrs.get("aria-hidden") == "true" or attrs.get("role") in ("navigation", "banner", "contentinfo"):
            el.drop_tree()
        elif _BOILERPLATE.search(attrs.get("class", "") + " " + attrs.get("id", "")):
            # A class like "has-sidebar" can sit on the content wrapper: only drop small blocks.
            if len(el.text_content()) < 0.3 * total:
                el.drop_tree()
    body = _main_content(root)
    for el in body.iter(*_BLOCK_TAGS):
        el.tail = "\n" + (el.tail or "")
        if el.tag in ("td", "th"):
            el.tail = "\t" + (el.tail or "")[1:]
    lines = (" ".join(line.split()) for line in body.text_content().splitlines())
    return "\n".join(line for line in lines if line), title


def _main_content(root: Any) -> Any:
    """The <main> or <article> element when one holds most of the text, else <body>."""
    body = root.find(".//body")
    body = body if body is not None else root
    total = len(body.text_content().strip())
    for tag in ("main", "article"):
        found = body.findall(f".//{tag}")
        if len(found) == 1 and len(found[0].text_content().strip()) >= 0.3 * total:
            return found[0]
    return body


def extractor_of(ctx: Context) -> str:
    """The configured extractor; configs without the `html_extractor` key get the default."""
    return getattr(ctx.cfg, "html_extractor", DEFAULT_EXTRACTOR)


def read_html(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, title = html_to_text(data, extractor=extractor_of(ctx))
    meta = {"title": title} if title else {}
    if not text.strip():
        raise ReadError("no_text", "HTML has no main text (only scripts, styles, navigation or boilerplate)")
    yield Doc(text, "html", len(data), meta)


HTML = Format("html", read_html, extensions={".html", ".htm", ".xhtml", ".shtml"})
