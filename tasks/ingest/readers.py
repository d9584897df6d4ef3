"""Readers: raw bytes of one file in, documents and problems out.

`read_blob(name, data, ctx)` picks a reader by file name (compression suffixes
are peeled first) and yields `Doc`s and `Problem`s. Single-document formats
(text, code, Markdown, HTML, PDF, DOCX, PPTX, images) yield one item with
`pos=None`; containers (JSONL/JSON arrays, Parquet/Arrow, WARC, zip/tar) yield
one item per raw record with its position, which becomes `#n` in the source.

Which reader handles what, and why:
- direct, fast readers for plain text, code, Markdown, JSON(L), Parquet/Arrow:
  decoding is all there is to do;
- lxml for HTML and WARC responses: main-content extraction with navigation,
  scripts and boilerplate removed, several times faster than a partitioner;
- pypdf (pdfminer.six as fallback) for the PDF text layer, Tesseract for images
  and PDFs without one;
- python-docx / python-pptx directly for DOCX and PPTX (body text and tables in
  reading order, speaker notes): the same libraries unstructured wraps, without
  its per-element classification, which costs most of its time;
- unstructured for e-mail (.eml: MIME parts, HTML bodies, headers), and for DOCX/PPTX
  when `office_reader: unstructured`; kept offline by `offline_nlp`.

A file-level failure raises `ReadError(reason, message)`; a record-level one
(one bad JSONL line) is yielded as a `Problem` so the good records survive.
"""

from __future__ import annotations

import bz2
import codecs
import ctypes
import gzip
import io
import itertools
import json
import logging
import lzma
import re
import shutil
import subprocess
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from refinery.tasks.ingest.config import IngestConfig

logging.getLogger("pypdf").setLevel(logging.ERROR)
logging.getLogger("pdfminer").setLevel(logging.ERROR)

# -- what readers produce --------------------------------------------------------------------


@dataclass
class Doc:
    text: str
    format: str
    nbytes: int
    meta: dict[str, Any] = field(default_factory=dict)
    pos: int | None = None


@dataclass
class Problem:
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


class FileTimeout(BaseException):
    """Raised inside a parse that ran past `file_timeout_s`.

    A BaseException, so that `except Exception` in a parser library can't swallow it.
    """


@dataclass
class Context:
    """Per-file settings and budgets shared by nested readers (archive members)."""

    cfg: IngestConfig
    deadline: float
    decompressed: int = 0  # bytes produced by decompression so far, against max_decompressed_bytes

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


# -- format detection ------------------------------------------------------------------------

CODE_LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".ipynb": "jupyter", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp",
    ".hh": "cpp", ".cs": "csharp", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php",
    ".swift": "swift", ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala", ".sh": "shell",
    ".bash": "shell", ".zsh": "shell", ".ps1": "powershell", ".sql": "sql", ".r": "r", ".lua": "lua",
    ".pl": "perl", ".pm": "perl", ".hs": "haskell", ".jl": "julia", ".m": "objective-c", ".mm": "objective-c",
    ".dart": "dart", ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".clj": "clojure",
    ".ml": "ocaml", ".fs": "fsharp", ".f90": "fortran", ".zig": "zig", ".nim": "nim", ".v": "verilog",
    ".vhd": "vhdl", ".css": "css", ".scss": "scss", ".less": "less", ".vue": "vue", ".svelte": "svelte",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".xml": "xml",
    ".proto": "protobuf", ".graphql": "graphql", ".tf": "hcl", ".groovy": "groovy", ".gradle": "groovy",
    ".cmake": "cmake", ".tex": "latex", ".asm": "assembly", ".s": "assembly", ".bat": "batch",
}
CODE_FILENAMES = {"dockerfile": "dockerfile", "makefile": "makefile", "cmakelists.txt": "cmake",
                  "gemfile": "ruby", "rakefile": "ruby", "jenkinsfile": "groovy"}
TEXT_EXT = {".txt", ".text", ".log", ".csv", ".tsv", ".rst", ".org", ".adoc", ".srt", ".vtt", ""}
MARKDOWN_EXT = {".md", ".markdown", ".mdown", ".mkd", ".mdx"}
HTML_EXT = {".html", ".htm", ".xhtml", ".shtml"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pnm"}
JSONL_EXT = {".jsonl", ".ndjson", ".jsonlines"}
ARROW_EXT = {".arrow", ".feather", ".ipc"}
COMPRESSION = {".gz": "gzip", ".tgz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}


def split_name(name: str) -> tuple[str, str]:
    """(lower-cased base name, extension) of the last path component."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    dot = base.rfind(".")
    return base, (base[dot:] if dot > 0 else "")


def detect(name: str) -> str:
    """The reader kind for a (decompressed) file name."""
    base, ext = split_name(name)
    if base in CODE_FILENAMES:
        return "code"
    if ext in TEXT_EXT:
        return "text"
    if ext in MARKDOWN_EXT:
        return "markdown"
    if ext in HTML_EXT:
        return "html"
    if ext == ".pdf":
        return "pdf"
    if ext in (".docx", ".docm"):
        return "docx"
    if ext == ".pptx":
        return "pptx"
    if ext == ".eml":
        return "email"
    if ext in IMAGE_EXT:
        return "image"
    if ext in JSONL_EXT:
        return "jsonl"
    if ext == ".json":
        return "json"
    if ext == ".parquet":
        return "parquet"
    if ext in ARROW_EXT:
        return "arrow"
    if ext in (".warc", ".arc"):
        return "warc"
    if ext == ".zip":
        return "zip"
    if ext == ".tar":
        return "tar"
    if ext in CODE_LANGUAGES:
        return "code"
    return "unknown"


# -- entry point -----------------------------------------------------------------------------

MAX_DEPTH = 3  # archives inside archives inside archives


def read_blob(name: str, data: bytes, ctx: Context, depth: int = 0) -> Iterator[Item]:
    """Documents and problems in one file's bytes; `name` picks the reader."""
    if not data:
        raise ReadError("empty", "zero-byte file")
    _, ext = split_name(name)
    if ext in COMPRESSION:
        inner = name[: -len(ext)] + (".tar" if ext == ".tgz" else "")
        yield from read_blob(inner, decompress(data, COMPRESSION[ext], ctx), ctx, depth)
        return
    kind = detect(name)
    if kind in ("zip", "tar"):
        if depth >= MAX_DEPTH:
            raise ReadError("unsupported_format", f"archive nested deeper than {MAX_DEPTH} levels")
        yield from (read_zip if kind == "zip" else read_tar)(data, ctx, depth)
        return
    reader = READERS.get(kind)
    if reader is None:
        yield from read_unknown(name, data, ctx)
        return
    yield from reader(name, data, ctx)


def decompress(data: bytes, method: str, ctx: Context) -> bytes:
    """Decompress with a running bound, so a bomb stops at the limit instead of filling memory."""
    if method == "gzip":
        stream: Any = gzip.GzipFile(fileobj=io.BytesIO(data))
    elif method == "bz2":
        stream = bz2.BZ2File(io.BytesIO(data))
    elif method == "xz":
        stream = lzma.LZMAFile(io.BytesIO(data))
    else:
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    try:
        while chunk := stream.read(1 << 20):
            ctx.charge(len(chunk))
            out += chunk
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
        truncated = isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "premature" in str(exc).lower()
        reason = "truncated" if truncated else "corrupt"
        raise ReadError(reason, f"{method} stream: {exc}") from exc
    except Exception as exc:  # zstandard.ZstdError has no common base with the above
        raise ReadError("corrupt", f"{method} stream: {exc}") from exc
    if method == "zstd":
        _check_zstd_complete(data, len(out))
    return bytes(out)


def _check_zstd_complete(data: bytes, produced: int) -> None:
    """zstd's stream reader stops quietly at a cut; compare with the size the frame declares."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ReadError("corrupt", f"zstd stream: {exc}") from exc
    if produced == 0 or 0 <= produced < declared:
        raise ReadError("truncated", f"zstd stream: ends early ({produced} of {max(declared, 0)} bytes)")


# -- text ------------------------------------------------------------------------------------

_BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
]
_CONTROL = bytes(range(0, 9)) + bytes(range(14, 32))
_SAMPLE = 1 << 16
_PREFERRED = ("cp1252", "latin_1", "iso8859_15", "cp1251", "gb18030", "shift_jis", "euc_kr", "big5")


def decode_text(data: bytes, declared: str | None = None) -> tuple[str, str]:
    """(text, encoding): BOMs first, then strict UTF-8, then charset-normalizer's best guess.

    Raises `ReadError("binary")` for data that is not text at all.
    """
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return data.decode(enc, errors="replace"), enc.replace("-sig", "")
    head = data[:_SAMPLE]
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

    matches = from_bytes(head if len(data) > _SAMPLE else data)
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


def _text_doc(text: str, fmt: str, nbytes: int, meta: dict[str, Any], what: str) -> Doc:
    if not text.strip():
        raise ReadError("no_text", f"{what} holds only whitespace")
    return Doc(text, fmt, nbytes, meta)


def read_text(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, enc = decode_text(data)
    yield _text_doc(text, "text", len(data), {"encoding": enc}, "text file")


def read_code(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    base, ext = split_name(name)
    lang = CODE_FILENAMES.get(base) or CODE_LANGUAGES.get(ext, "unknown")
    text, enc = decode_text(data)
    yield _text_doc(text, "code", len(data), {"language": lang, "encoding": enc}, "source file")


_MD_TITLE = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def read_markdown(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    # Markdown is kept as written: its markup is cheap, meaningful text for a language model.
    text, enc = decode_text(data)
    meta: dict[str, Any] = {"encoding": enc}
    if m := _MD_TITLE.search(text[:20_000]):
        meta["title"] = m.group(1)
    yield _text_doc(text, "markdown", len(data), meta, "Markdown file")


def read_unknown(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Unknown extension: ingest it as text when it decodes as text, else say so."""
    try:
        text, enc = decode_text(data)
    except ReadError as exc:
        _, ext = split_name(name)
        raise ReadError("unsupported_format", f"unknown file type {ext or '(no extension)'!r}: {exc.message}") from exc
    yield _text_doc(text, "text", len(data), {"encoding": enc}, "file")


# -- HTML ------------------------------------------------------------------------------------

_DROP_TAGS = ["script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "embed",
              "nav", "footer", "aside", "form", "button", "select", "dialog", "menu", "head"]
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6",
               "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "thead", "tbody", "blockquote", "pre",
               "br", "hr", "figure", "figcaption", "address", "details", "summary", "td", "th", "caption"}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
_BOILERPLATE = re.compile(r"(^|[\s_-])(nav|navbar|menu|breadcrumbs?|sidebar|cookie|footer|share|social|advert|ads?)($|[\s_-])",
                          re.IGNORECASE)


def html_to_text(data: bytes, charset: str | None = None) -> tuple[str, str | None]:
    """(main text, title) of an HTML page: navigation, scripts and boilerplate removed."""
    import lxml.html
    from lxml import etree

    if charset is None and (m := _META_CHARSET.search(data[:4096])):
        charset = m.group(1).decode("ascii", "replace")
    markup, _ = decode_text(data, declared=charset)
    markup = _XML_DECL.sub("", markup, count=1)
    if not markup.strip():
        return "", None
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


def read_html(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, title = html_to_text(data)
    meta = {"title": title} if title else {}
    if not text.strip():
        raise ReadError("no_text", "HTML has no visible text (only scripts, styles or navigation)")
    yield Doc(text, "html", len(data), meta)


# -- PDF -------------------------------------------------------------------------------------


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
        png = _run(["pdftoppm", "-png", "-r", "200", "-f", str(page), "-l", str(page), "-"], data, ctx, "pdftoppm")
        texts.append(_tesseract(png, ctx).strip())
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise ReadError("no_text", "PDF has no text layer and OCR found no text")
    return text


# -- images ----------------------------------------------------------------------------------


def ocr_status(cfg: IngestConfig) -> tuple[bool, str]:
    """(available, why not): whether image files can be OCRed with this config."""
    if not cfg.ocr:
        return False, "ocr is off in the ingest config; set `ocr: true` (and install Tesseract) to read images"
    if not shutil.which(cfg.tesseract_cmd):
        return False, (
            f"Tesseract ({cfg.tesseract_cmd!r}) is not installed, so images can't be OCRed: install it "
            "(Debian/Ubuntu: apt-get install tesseract-ocr; macOS: brew install tesseract) or set "
            "`tesseract_cmd` to its path; set `ocr: false` to quarantine images as `ocr_disabled`"
        )
    return True, ""


def read_image(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    ok, why = ocr_status(ctx.cfg)
    if not ok:
        raise ReadError("ocr_disabled" if not ctx.cfg.ocr else "ocr_unavailable", why)
    text = _tesseract(data, ctx)
    if not text.strip():
        raise ReadError("no_text", "OCR found no text in the image")
    yield Doc(text.strip(), "image", len(data), {"ocr": "tesseract", "ocr_lang": ctx.cfg.ocr_lang})


def _tesseract(image: bytes, ctx: Context) -> str:
    out = _run([ctx.cfg.tesseract_cmd, "stdin", "stdout", "-l", ctx.cfg.ocr_lang], image, ctx, "tesseract")
    return out.decode("utf-8", errors="replace")


def _run(cmd: list[str], stdin: bytes, ctx: Context, what: str) -> bytes:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=ctx.remaining_s(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise FileTimeout(f"{what} ran past file_timeout_s") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ReadError("corrupt", f"{what} failed: {err[-1] if err else f'exit code {proc.returncode}'}")
    return proc.stdout


# -- office formats and email ---------------------------------------------------------------


def _check_zip(data: bytes, kind: str) -> None:
    if not data.startswith(b"PK\x03\x04"):
        raise ReadError("corrupt", f"not a {kind.upper()} file: a {kind.upper()} is a zip container and this is not one")
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as exc:
        raise ReadError("corrupt", f"broken {kind.upper()} zip container: {exc}") from exc
    if bad is not None:
        raise ReadError("corrupt", f"broken {kind.upper()} zip container: bad CRC in {bad!r}")


def _docx_direct(data: bytes) -> tuple[str, dict[str, Any]]:
    """Body paragraphs and tables in document order (headers and footers are boilerplate)."""
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


def _pptx_direct(data: bytes) -> tuple[str, dict[str, Any]]:
    """Slide text top-to-bottom, left-to-right (tables and groups included), then speaker notes."""
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


def _office_unstructured(data: bytes, kind: str) -> tuple[str, dict[str, Any]]:
    """unstructured's partitioner, for `office_reader: unstructured` (element model, slower)."""
    from refinery.tasks.ingest.offline_nlp import use_offline_nlp

    use_offline_nlp()
    if kind == "docx":
        from unstructured.partition.docx import partition_docx as partition
    else:
        from unstructured.partition.pptx import partition_pptx as partition
    elements = partition(file=io.BytesIO(data))
    texts = [e.text for e in elements if getattr(e, "text", "").strip()]
    meta: dict[str, Any] = {"reader": "unstructured"}
    titles = [e.text for e in elements if getattr(e, "category", "") == "Title" and e.text.strip()]
    if titles:
        meta["title"] = titles[0]
    if kind == "pptx":
        pages = {getattr(e.metadata, "page_number", None) for e in elements}
        meta["slides"] = len({p for p in pages if p is not None})
    return "\n\n".join(texts), meta


def _office(data: bytes, kind: str, ctx: Context) -> tuple[str, dict[str, Any]]:
    _check_zip(data, kind)
    try:
        if ctx.cfg.office_reader == "unstructured":
            return _office_unstructured(data, kind)
        return (_docx_direct if kind == "docx" else _pptx_direct)(data)
    except ReadError:
        raise
    except Exception as exc:  # python-docx/pptx raise KeyError, ValueError, lxml errors...
        raise ReadError("corrupt", f"unreadable {kind.upper()}: {type(exc).__name__}: {exc}") from exc


def read_docx(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, meta = _office(data, "docx", ctx)
    yield _text_doc(text, "docx", len(data), meta, "DOCX")


def read_pptx(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    text, meta = _office(data, "pptx", ctx)
    yield _text_doc(text, "pptx", len(data), meta, "PPTX")


def read_email(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """E-mail (.eml) through unstructured: MIME parts, HTML bodies and headers are its strength."""
    from refinery.tasks.ingest.offline_nlp import use_offline_nlp

    use_offline_nlp()
    from unstructured.partition.email import partition_email

    try:
        elements = partition_email(file=io.BytesIO(data), process_attachments=False)
    except Exception as exc:  # noqa: BLE001 (the email package raises many types)
        raise ReadError("corrupt", f"unreadable e-mail: {type(exc).__name__}: {exc}") from exc
    texts = [e.text for e in elements if getattr(e, "text", "").strip()]
    meta: dict[str, Any] = {"reader": "unstructured"}
    if elements:
        md = elements[0].metadata
        for key, attr in (("subject", "subject"), ("from", "sent_from"), ("date", "last_modified")):
            value = getattr(md, attr, None)
            if value:
                meta[key] = value if isinstance(value, str) else ", ".join(map(str, value))
    yield _text_doc("\n\n".join(texts), "text", len(data), meta, "e-mail")


# -- datasets --------------------------------------------------------------------------------

_META_SCALARS = (str, int, float, bool)


def _record_doc(record: Any, ctx: Context, fmt: str, nbytes: int, pos: int, where: str) -> Item:
    field_name = ctx.cfg.jsonl_text_field
    if not isinstance(record, dict):
        return Problem("missing_text_field", f"{where}: a {type(record).__name__}, not an object with {field_name!r}", pos)
    text = record.get(field_name)
    if not isinstance(text, str):
        why = "missing" if text is None else f"a {type(text).__name__}, not a string"
        return Problem("missing_text_field", f"{where}: field {field_name!r} is {why}; set jsonl_text_field", pos)
    if not text.strip():
        return Problem("no_text", f"{where}: field {field_name!r} is empty", pos)
    meta = {k: v for k, v in record.items()
            if k != field_name and isinstance(v, _META_SCALARS) and len(str(v)) <= 512}
    return Doc(text, fmt, nbytes, meta, pos)


def read_jsonl(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """One record per line; a bad line is quarantined by its number and the rest are kept."""
    start = 0
    lineno = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        line = data[start:end]
        start = end + 1
        lineno += 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Problem("invalid_json", f"line {lineno}: {exc}", lineno - 1)
            continue
        item = _record_doc(record, ctx, "jsonl", len(line), lineno - 1, f"line {lineno}")
        if isinstance(item, Doc):
            item.meta["line"] = lineno
        yield item


def read_json(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """A JSON array of records (or one record)."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if b"\n{" in data[:_SAMPLE]:  # JSON Lines saved as .json
            yield from read_jsonl(name, data, ctx)
            return
        raise ReadError("invalid_json", f"not valid JSON: {exc}") from exc
    records = value if isinstance(value, list) else [value]
    for i, record in enumerate(records):
        nbytes = len(json.dumps(record, ensure_ascii=False).encode("utf-8")) if len(records) > 1 else len(data)
        yield _record_doc(record, ctx, "jsonl", nbytes, i, f"element {i}")


def _dataset_batches(table_like: Any, column: str, where: str) -> Iterator[Item]:
    pos = 0
    for batch in table_like:
        for value in batch.column(0).to_pylist():
            if value is None:
                yield Problem("missing_text_field", f"{where} row {pos}: {column!r} is null", pos)
            elif not isinstance(value, str):
                yield Problem("missing_text_field", f"{where} row {pos}: {column!r} is not a string", pos)
            elif not value.strip():
                yield Problem("no_text", f"{where} row {pos}: {column!r} is empty", pos)
            else:
                yield Doc(value, "parquet", len(value.encode("utf-8")), {"row": pos}, pos)
            pos += 1


def _missing_column(column: str, names: list[str]) -> ReadError:
    return ReadError("missing_text_column",
                     f"no column {column!r} (columns: {', '.join(names)}); set parquet_text_column")


def read_parquet(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Stream the text column in batches; other columns are never decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = ctx.cfg.parquet_text_column
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"unreadable Parquet: {exc}") from exc
    names = pf.schema_arrow.names
    if column not in names:
        raise _missing_column(column, names)
    try:
        yield from _dataset_batches(pf.iter_batches(batch_size=4096, columns=[column]), column, "Parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReadError("corrupt", f"Parquet file broken part-way: {exc}") from exc


def read_arrow(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    import pyarrow as pa

    column = ctx.cfg.parquet_text_column
    try:
        try:
            reader: Any = pa.ipc.open_file(pa.BufferReader(data))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_stream(pa.BufferReader(data))
            batches = iter(reader)
        names = reader.schema.names
        if column not in names:
            raise _missing_column(column, names)
        idx = names.index(column)
        selected = (b.select([idx]) for b in batches)
        yield from _dataset_batches(selected, column, "Arrow")
    except pa.ArrowInvalid as exc:
        raise ReadError("corrupt", f"unreadable Arrow IPC file: {exc}") from exc


# -- WARC ------------------------------------------------------------------------------------

_CHARSET = re.compile(r"charset=([\w\-:.]+)", re.IGNORECASE)


def read_warc(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Each HTTP response is a record; HTML is extracted, plain text decoded, others quarantined."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    pos = 0
    try:
        for record in ArchiveIterator(io.BytesIO(data)):
            if record.rec_type != "response":
                continue
            url = record.rec_headers.get_header("WARC-Target-URI")
            date = record.rec_headers.get_header("WARC-Date")
            ctype = (record.http_headers.get_header("Content-Type") if record.http_headers else None) or ""
            payload = record.content_stream().read()
            meta: dict[str, Any] = {"url": url, "date": date, "content_type": ctype.split(";")[0].strip()}
            if record.http_headers is not None:
                meta["status"] = record.http_headers.get_statuscode()
            item = _warc_item(payload, ctype, meta, pos)
            pos += 1
            yield item
    except (ArchiveLoadFailed, EOFError, zlib.error, ValueError) as exc:
        raise ReadError("corrupt", f"unreadable WARC after {pos} responses: {exc}") from exc


def _warc_item(payload: bytes, ctype: str, meta: dict[str, Any], pos: int) -> Item:
    mime = meta["content_type"].lower()
    charset = m.group(1) if (m := _CHARSET.search(ctype)) else None
    try:
        if mime in ("text/html", "application/xhtml+xml") or (not mime and b"<html" in payload[:2048].lower()):
            text, title = html_to_text(payload, charset)
            if title:
                meta["title"] = title
        elif mime.startswith("text/"):
            text, _ = decode_text(payload, declared=charset)
        else:
            return Problem("unsupported_format", f"{meta['url']}: content type {mime or 'unknown'!r} is not text", pos)
    except ReadError as exc:
        return Problem(exc.reason, f"{meta['url']}: {exc.message}", pos)
    if not text.strip():
        return Problem("no_text", f"{meta['url']}: no visible text", pos)
    return Doc(text, "warc", len(payload), meta, pos)


# -- archives --------------------------------------------------------------------------------


def unsafe_member(name: str) -> bool:
    """True for names that would land outside the folder they're extracted to."""
    norm = name.replace("\\", "/")
    return norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) is not None or ".." in norm.split("/")


def _member_items(member: str, data: bytes, ctx: Context, depth: int) -> Iterator[Item]:
    """Items of one archive member, with file-level errors turned into a Problem."""
    try:
        items = list(read_blob(member, data, ctx, depth + 1))
    except ReadError as exc:
        if exc.reason == "decompression_limit":
            raise
        items = [Problem(exc.reason, exc.message)]
    except (FileTimeout, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (one bad member must not lose its siblings)
        items = [Problem("parse_error", f"{type(exc).__name__}: {exc}")]
    if not items:
        items = [Problem("no_records", "member holds no records")]
    for item in items:
        if isinstance(item, Doc):
            inner = item.meta.pop("member", None)  # a member of a nested archive: join the paths
            record = item.meta.pop("member_record", None) if inner else item.pos
            item.meta["member"] = f"{member}/{inner}" if inner else member
            if record is not None:
                item.meta["member_record"] = record
        else:
            item.error = f"member {member!r}: {item.error}"
        yield item


def _bounded_read(f: Any, limit: int, ctx: Context) -> bytes:
    out = bytearray()
    while chunk := f.read(1 << 20):
        ctx.charge(len(chunk))
        out += chunk
        if len(out) > limit:
            raise ReadError("too_large", f"member larger than max_file_bytes={limit}")
    return bytes(out)


def _number(items: Iterator[Item]) -> Iterator[Item]:
    """Give every item in an archive its running position (`#n` across all members)."""
    for n, item in enumerate(items):
        item.pos = n
        yield item


def read_zip(data: bytes, ctx: Context, depth: int) -> Iterator[Item]:
    yield from _number(_zip_items(data, ctx, depth))


def _zip_items(data: bytes, ctx: Context, depth: int) -> Iterator[Item]:
    from refinery.tasks.ingest.sources import glob_match

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise ReadError("corrupt", f"unreadable zip archive: {exc}") from exc
    if not [i for i in infos if not i.is_dir()]:
        raise ReadError("no_records", "zip archive holds no files")
    for info in infos:
        name = info.filename
        if info.is_dir():
            continue
        if unsafe_member(name):
            yield Problem("unsafe_path", f"member {name!r} points outside the archive folder; not read")
            continue
        if glob_match(name, ctx.cfg.exclude):
            continue
        if info.flag_bits & 0x1:
            yield Problem("encrypted", f"member {name!r} is encrypted")
            continue
        try:
            with zf.open(info) as f:
                member = _bounded_read(f, ctx.cfg.max_file_bytes, ctx)
        except ReadError as exc:
            if exc.reason == "decompression_limit":
                raise
            yield Problem(exc.reason, f"member {name!r}: {exc.message}")
            continue
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError) as exc:
            yield Problem("corrupt", f"member {name!r}: {exc}")
            continue
        yield from _member_items(name, member, ctx, depth)


def read_tar(data: bytes, ctx: Context, depth: int) -> Iterator[Item]:
    yield from _number(_tar_items(data, ctx, depth))


def _tar_items(data: bytes, ctx: Context, depth: int) -> Iterator[Item]:
    from refinery.tasks.ingest.sources import glob_match

    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError) as exc:
        raise ReadError("corrupt", f"unreadable tar archive: {exc}") from exc
    any_file = False
    try:
        for info in tf:
            name = info.name
            if info.isdir():
                continue
            any_file = True
            if unsafe_member(name) or (info.issym() or info.islnk()) and unsafe_member(info.linkname or ".."):
                yield Problem("unsafe_path", f"member {name!r} points outside the archive folder; not read")
                continue
            if glob_match(name, ctx.cfg.exclude):
                continue
            if not info.isfile():
                yield Problem("not_a_regular_file", f"member {name!r} is a link or device; not read")
                continue
            if info.size > ctx.cfg.max_file_bytes:
                yield Problem("too_large", f"member {name!r} is {info.size} bytes, over max_file_bytes")
                continue
            f = tf.extractfile(info)
            member = _bounded_read(f, ctx.cfg.max_file_bytes, ctx) if f is not None else b""
            yield from _member_items(name, member, ctx, depth)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ReadError("truncated" if isinstance(exc, EOFError | tarfile.ReadError) else "corrupt",
                        f"tar archive broken part-way: {exc}") from exc
    if not any_file:
        raise ReadError("no_records", "tar archive holds no files")


READERS = {
    "text": read_text, "code": read_code, "markdown": read_markdown, "html": read_html, "pdf": read_pdf,
    "docx": read_docx, "pptx": read_pptx, "email": read_email, "image": read_image, "jsonl": read_jsonl, "json": read_json,
    "parquet": read_parquet, "arrow": read_arrow, "warc": read_warc,
}


# -- per-file time limit ---------------------------------------------------------------------


class _Watchdog:
    """One daemon thread per process that raises `FileTimeout` in threads past their deadline.

    It injects the exception with `PyThreadState_SetAsyncExc`, so it works in any thread
    (in-process, worker processes, Dask threads) and costs nothing per file beyond a
    dict entry. The exception lands between Python bytecodes: a single long call into C
    finishes first (subprocesses such as Tesseract get their own timeout). It fires
    again every `RETRY_S` in case a `__del__` or weakref callback swallowed it.
    """

    RETRY_S = 0.2

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: dict[int, list[Any]] = {}  # token -> [deadline, thread id, fired]
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def register(self, seconds: float) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():  # first use, or after a fork
                self._thread = threading.Thread(target=self._run, name="ingest-file-timeout", daemon=True)
                self._thread.start()
            token = next(self._tokens)
            deadline = time.monotonic() + seconds
            self._active[token] = [deadline, threading.get_ident(), False]
            if deadline < self._wake_at:
                self._cond.notify()
            return token

    def unregister(self, token: int) -> bool:
        """Stop watching; True if the deadline passed (no exception fires after this returns)."""
        with self._cond:
            return self._active.pop(token)[2]

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for entry in self._active.values():
                    if entry[0] <= now:
                        entry[2] = True
                        entry[0] = now + self.RETRY_S
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry[1]), ctypes.py_object(FileTimeout))
                self._wake_at = min((e[0] for e in self._active.values()), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)


_WATCHDOG = _Watchdog()


class time_limit:  # noqa: N801 (used as a context manager, reads like one)
    """Raise `FileTimeout` in the current thread once `seconds` have passed (see `_Watchdog`).

    `__exit__` raises `FileTimeout` whenever the deadline passed, whatever happened inside.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._token = -1

    def __enter__(self) -> time_limit:
        self._token = _WATCHDOG.register(self.seconds)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if _WATCHDOG.unregister(self._token):
            # Clear an exception still pending so it can't surface later in unrelated code.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
            raise FileTimeout(f"parse ran past file_timeout_s={self.seconds}")
        return False
