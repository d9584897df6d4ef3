"""The bundled sample corpus: built offline, deterministically, from what every Python ships.

`refinery run` with no source needs raw documents that any machine can make in
seconds without a download. Python carries a few MB of real, readable material:
its standard library's source files (code), the reference documentation text in
`pydoc_data.topics` (English prose with headings, lists and code), and docstrings.
This module renders that material into mixed formats (`.py`, `.txt`, `.md`,
`.html`, `.pdf`, `.docx`, `.jsonl`) and plants the cases every stage must handle:
exact duplicates, near duplicates, low-quality pages, other languages and files
that ingest must quarantine. `.corpus.json` lists every planted item so that
tests can check each stage did its part.

The same Python, size and seed give the same bytes: listings are sorted, the RNG
is seeded, PDF and DOCX metadata and zip timestamps are fixed.
"""

from __future__ import annotations

import ast
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

BUILDER_VERSION = 1
MANIFEST_NAME = ".corpus.json"  # hidden, so ingest (which skips hidden files) never reads it
FORMATS: tuple[str, ...] = ("code", "text", "markdown", "html", "pdf", "docx", "jsonl")
PLANTED_KINDS: tuple[str, ...] = (
    "exact_duplicates",
    "near_duplicates",
    "low_quality",
    "non_english",
    "bad_files",
)
_KIND_COUNT = {
    "exact_duplicate": "exact_duplicates",
    "near_duplicate": "near_duplicates",
    "low_quality": "low_quality",
    "non_english": "non_english",
    "bad_file": "bad_files",
}
# The fixed instant stamped into PDF and DOCX metadata and zip entries.
_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)
# Standard-library folders left out: tests (odd encodings, deliberate syntax errors), and
# folders that distributions often package apart, so a selection stays stable.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "distutils",
        "__pycache__",
        "venv",
        "pydoc_data",
        "encodings",
    }
)


class CorpusInfo(BaseModel):
    """What `build_sample_corpus` wrote."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    files: int  # raw files written, the bad ones included, `.corpus.json` excluded
    bytes: int  # their total size
    documents: int  # documents the readable files hold (each JSONL line counts)
    by_format: dict[str, int]  # files per format folder
    planted: dict[str, int]  # items per planted kind (see PLANTED_KINDS)


class PlantedItem(BaseModel):
    """One planted case, as recorded in `.corpus.json`."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exact_duplicate", "near_duplicate", "low_quality", "non_english", "bad_file"]
    path: str  # relative to the corpus root, POSIX separators
    record: int | None = None  # 0-based line in a JSONL file; None for a whole file
    of: str | None = None  # duplicates: the original, as "path" or "path#record"
    detail: str = ""  # rule the item should trip, language, similarity...


@dataclass(frozen=True)
class _Plan:
    """How much of each thing a size gets."""

    code_bytes: int  # stdlib source copied into code/
    code_max_file: int  # the largest source file taken
    parse_max_file: int  # larger modules are not parsed for docstrings (keeps tiny fast)
    topics: dict[str, int]  # pydoc topics rendered per format
    topic_max_chars: int
    pdf_min_chars: int  # a PDF topic must be long enough for several pages
    reference_pages: dict[str, int]  # module reference pages per format
    reference_max_chars: int
    jsonl_records: int
    variants: int  # how many variants of each planted case


_PLANS: dict[str, _Plan] = {
    "tiny": _Plan(
        code_bytes=60_000,
        code_max_file=6_000,
        parse_max_file=15_000,
        topics={"pdf": 1, "docx": 1, "html": 2, "markdown": 5, "text": 6},
        topic_max_chars=7_000,
        pdf_min_chars=5_000,
        reference_pages={"html": 2, "markdown": 1, "docx": 1, "pdf": 1},
        reference_max_chars=6_000,
        jsonl_records=16,
        variants=1,
    ),
    "default": _Plan(
        code_bytes=1_800_000,
        code_max_file=120_000,
        parse_max_file=400_000,
        topics={"pdf": 6, "docx": 8, "html": 15, "markdown": 25, "text": 999},
        topic_max_chars=1_000_000,
        pdf_min_chars=8_000,
        reference_pages={"html": 60, "markdown": 30, "docx": 10, "pdf": 6},
        reference_max_chars=30_000,
        jsonl_records=150,
        variants=2,
    ),
}


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def build_sample_corpus(
    dest: Path, size: Literal["tiny", "default"] = "default", seed: int = 0
) -> CorpusInfo:
    """Write the sample corpus into `dest` and describe it.

    Idempotent: when `dest` already holds this very build (same builder version,
    size, seed and Python), it returns at once. The corpus is built in a temporary
    sibling folder and renamed into place, so `dest` never holds half a corpus.
    """
    if size not in _PLANS:
        raise ValueError(f"size must be one of {', '.join(_PLANS)}, got {size!r}")
    dest = Path(dest).expanduser().absolute()
    build_key = _build_key(size, seed)
    existing = _read_manifest(dest)
    if existing is not None and existing.get("build") == build_key:
        return CorpusInfo(root=dest, **existing["info"])
    if dest.exists() and existing is None and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} exists and holds no sample corpus; pass a new or empty folder to build into"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}.", dir=dest.parent))
    try:
        info = _Builder(tmp, _PLANS[size], random.Random(seed)).build(build_key)
        if dest.exists():  # an empty folder, or an older build of ours
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info.model_copy(update={"root": dest})


def planted_items(root: Path) -> list[PlantedItem]:
    """The planted items a built corpus records in its `.corpus.json`."""
    manifest = _read_manifest(Path(root))
    if manifest is None:
        raise FileNotFoundError(f"{root} holds no {MANIFEST_NAME}; build it with build_sample_corpus()")
    return [PlantedItem(**item) for item in manifest["planted"]]


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard similarity of two texts' lowercased word n-gram sets (how near duplicates are measured)."""
    sa, sb = _shingles(a, n), _shingles(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def _build_key(size: str, seed: int) -> dict[str, object]:
    return {
        "builder_version": BUILDER_VERSION,
        "size": size,
        "seed": seed,
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Source material: stdlib modules and pydoc topics, as blocks of a simple document model
# ---------------------------------------------------------------------------------------

# A document is a title and a list of blocks: ("h", level, text), ("p", text),
# ("code", text), ("ul", [items]). Every renderer below walks the same blocks.
Block = tuple


@dataclass
class _Doc:
    name: str  # file stem
    title: str
    blocks: list[Block]
    plain: str = ""  # the text form (.txt body, JSONL text)


@dataclass
class _Module:
    rel: str  # path inside the stdlib, POSIX
    path: Path
    size: int


def _stdlib_modules() -> list[_Module]:
    """Every stdlib `.py` file outside the skipped folders, sorted by relative path."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    found: list[_Module] = []
    for dirpath, dirnames, filenames in os.walk(lib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append(_Module(path.relative_to(lib).as_posix(), path, path.stat().st_size))
    found.sort(key=lambda m: m.rel)
    return found


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _reference_doc(module: _Module, tree: ast.Module) -> _Doc:
    """A module reference page: the module docstring, then each public class and function."""
    name = _module_name(module.rel)
    blocks: list[Block] = []
    doc = ast.get_docstring(tree)
    if doc:
        blocks.extend(_paragraph_blocks(doc))
    for node in tree.body:
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_") or not ast.get_docstring(node):
            continue
        blocks.append(("h", 2, _signature(node)))
        blocks.extend(_paragraph_blocks(ast.get_docstring(node) or ""))
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                    sub_doc = ast.get_docstring(sub)
                    if sub_doc:
                        blocks.append(("h", 3, f"{node.name}.{_signature(sub)}"))
                        blocks.extend(_paragraph_blocks(sub_doc))
    title = f"The {name} module"
    return _Doc(name="module-" + name.replace(".", "-"), title=title, blocks=blocks)


def _signature(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    return f"{node.name}({ast.unparse(node.args)})"


def _paragraph_blocks(docstring: str) -> list[Block]:
    """Docstring text to blocks: blank-line separated paragraphs, indented or `>>>` parts as code."""
    blocks: list[Block] = []
    for chunk in re.split(r"\n\s*\n", docstring.strip()):
        lines = chunk.splitlines()
        if not lines:
            continue
        if all(line.startswith(("    ", ">>>", "...")) for line in lines if line.strip()):
            blocks.append(("code", textwrap.dedent(chunk)))
        elif all(line.lstrip().startswith(("- ", "* ")) for line in lines[:1]) and len(lines) > 1:
            blocks.append(("ul", [item.lstrip()[2:].strip() for item in lines if item.strip()]))
        else:
            blocks.append(("p", " ".join(line.strip() for line in lines)))
    return blocks


_UNDERLINES = {"*": 1, "=": 2, "-": 3, "^": 3, "~": 3}


def _topic_doc(key: str, text: str) -> _Doc:
    """A pydoc topic (reStructuredText rendered as plain text) to blocks."""
    lines = text.splitlines()
    blocks: list[Block] = []
    title = key
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if not stripped:
            i += 1
        elif nxt and len(set(nxt)) == 1 and nxt[0] in _UNDERLINES and len(nxt) >= len(stripped) - 2:
            level = _UNDERLINES[nxt[0]]
            if level == 1 and title == key:
                title = stripped
            else:
                blocks.append(("h", level, stripped))
            i += 2
        elif line.startswith("   "):  # indented: examples, grammar, notes
            j = i
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith("   ")):
                j += 1
            blocks.append(("code", textwrap.dedent("\n".join(lines[i:j])).strip("\n")))
            i = j
        elif stripped.startswith(("+-", "|")):  # a grid table: keep it preformatted
            j = i
            while j < len(lines) and lines[j].strip().startswith(("+", "|")):
                j += 1
            blocks.append(("code", "\n".join(lines[i:j])))
            i = j
        elif stripped.startswith(("* ", "- ")):
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                if lines[i].lstrip().startswith(("* ", "- ")):
                    items.append(lines[i].strip()[2:])
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            blocks.append(("ul", items))
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith("   "):
                j += 1
            blocks.append(("p", " ".join(part.strip() for part in lines[i:j])))
            i = j
    return _Doc(name="topic-" + key, title=title, blocks=blocks, plain=text.strip() + "\n")


# ---------------------------------------------------------------------------------------
# Renderers: one per format, each from the same blocks
# ---------------------------------------------------------------------------------------


def _to_text(doc: _Doc) -> str:
    if doc.plain:
        return doc.plain
    out = [doc.title, "=" * len(doc.title), ""]
    for block in doc.blocks:
        if block[0] == "h":
            out += [block[2], "-" * len(block[2]), ""]
        elif block[0] == "p":
            out += [textwrap.fill(block[1], 79), ""]
        elif block[0] == "code":
            out += [textwrap.indent(block[1], "    "), ""]
        elif block[0] == "ul":
            out += [textwrap.fill(item, 79, initial_indent="* ", subsequent_indent="  ") for item in block[1]]
            out.append("")
    return "\n".join(out).strip() + "\n"


def _to_markdown(doc: _Doc) -> str:
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if block[0] == "h":
            out += ["#" * max(2, min(block[1], 4)) + " " + block[2], ""]
        elif block[0] == "p":
            out += [textwrap.fill(block[1], 100), ""]
        elif block[0] == "code":
            lang = (
                "python"
                if block[1].startswith((">>>", "def ", "class ", "import ", "for ", "if "))
                else "text"
            )
            out += [f"```{lang}", block[1], "```", ""]
        elif block[0] == "ul":
            out += [f"- {item}" for item in block[1]] + [""]
    return "\n".join(out).strip() + "\n"


_HTML_PAGE = """<!DOCTYPE html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<title>{title} | Python Notes</title>
<link rel="stylesheet" href="/static/site.css">
<script>window.dataLayer = window.dataLayer || []; function track(e) {{ dataLayer.push(e); }}
track({{"event": "pageview", "page": "{name}"}});</script>
</head>
<body>
<header class="site-header"><a class="logo" href="/">Python Notes</a>
<form class="search" action="/search"><input name="q" placeholder="Search the notes"></form></header>
<nav class="site-nav"><ul>
<li><a href="/">Home</a></li><li><a href="/reference/">Language reference</a></li>
<li><a href="/library/">Library</a></li><li><a href="/about/">About</a></li><li><a href="/login">Sign in</a></li>
</ul></nav>
<div class="layout">
<aside class="sidebar"><h2>Related pages</h2><ul>{related}</ul>
<p class="ad">Sponsored: try our premium course today. Click here to learn more.</p></aside>
<main>
<article>
<h1>{title}</h1>
{body}
</article>
</main>
</div>
<footer class="site-footer"><p>Copyright 2024 Python Notes. All rights reserved.</p>
<p><a href="/privacy">Privacy policy</a> | <a href="/cookies">Cookie policy</a> | <a href="/terms">Terms of use</a></p>
</footer>
<script src="/static/analytics.js" async></script>
</body>
</html>
"""


def _to_html(doc: _Doc, related: Iterable[str] = (), lang: str = "en") -> str:
    body: list[str] = []
    for block in doc.blocks:
        if block[0] == "h":
            level = max(2, min(block[1], 4))
            body.append(f"<h{level}>{html.escape(block[2])}</h{level}>")
        elif block[0] == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif block[0] == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif block[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block[1]) + "</ul>")
    links = "".join(f'<li><a href="/{name}.html">{html.escape(name)}</a></li>' for name in related)
    return _HTML_PAGE.format(
        lang=lang, title=html.escape(doc.title), name=doc.name, related=links, body="\n".join(body)
    )


# Core PDF fonts speak Latin-1 only: map common typography first, then replace the rest.
_LATIN1 = str.maketrans(
    {
        "‘": "'",
        "’": "'",
        "“": '"',
        "”": '"',
        "–": "-",
        "—": "-",
        "…": "...",
        "•": "*",
        "→": "->",
        "←": "<-",
        "≤": "<=",
        "≥": ">=",
        "≠": "!=",
        "−": "-",
    }
)


def _latin1(text: str) -> str:
    return text.translate(_LATIN1).encode("latin-1", "replace").decode("latin-1")


def _to_pdf(doc: _Doc) -> bytes:
    """A text-layer PDF. Lines are wrapped here and set with `cell`: fpdf2's `multi_cell` line
    breaking is ten times slower, and a fixed width is plenty for core fonts on A4."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(_EPOCH)
    pdf.set_producer("refinery sample corpus")
    pdf.set_title(_latin1(doc.title))
    pdf.set_author("Python documentation")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()

    def lines(font: str, style: str, size: int, height: float, text: str, width: int) -> None:
        pdf.set_font(font, style, size)
        for line in text.splitlines() or [""]:
            for piece in textwrap.wrap(line, width, drop_whitespace=font != "Courier") or [""]:
                pdf.cell(0, height, _latin1(piece), new_x="LMARGIN", new_y="NEXT")

    lines("Helvetica", "B", 16, 8, doc.title, 60)
    pdf.ln(2)
    for block in doc.blocks:
        if block[0] == "h":
            lines("Helvetica", "B", 13 if block[1] <= 2 else 11, 7, block[2], 75)
        elif block[0] == "p":
            lines("Helvetica", "", 10, 5, block[1], 95)
        elif block[0] == "code":
            lines("Courier", "", 8, 4, block[1], 110)
        elif block[0] == "ul":
            for item in block[1]:
                lines("Helvetica", "", 10, 5, "- " + item, 95)
        pdf.ln(2)
    return bytes(pdf.output())


def _to_docx(doc: _Doc) -> bytes:
    import docx

    document = docx.Document()
    props = document.core_properties
    props.title = doc.title
    props.author = "Python documentation"
    props.last_modified_by = "refinery"
    props.created = props.modified = props.last_printed = _EPOCH.replace(tzinfo=None)
    props.revision = 1
    document.add_heading(doc.title, level=0)
    for block in doc.blocks:
        if block[0] == "h":
            document.add_heading(block[2], level=min(block[1], 3))
        elif block[0] == "p":
            document.add_paragraph(block[1])
        elif block[0] == "code":
            paragraph = document.add_paragraph()
            run = paragraph.add_run(block[1])
            run.font.name = "Courier New"
        elif block[0] == "ul":
            for item in block[1]:
                document.add_paragraph(item, style="List Bullet")
    buffer = io.BytesIO()
    document.save(buffer)
    return _fix_zip_dates(buffer.getvalue())


def _fix_zip_dates(data: bytes) -> bytes:
    """Rewrite a zip with fixed entry timestamps (python-docx stamps the current time)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            info = zipfile.ZipInfo(entry.filename, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            dst.writestr(info, src.read(entry.filename))
    return out.getvalue()


_EXTENSIONS = {
    "code": ".py",
    "text": ".txt",
    "markdown": ".md",
    "html": ".html",
    "pdf": ".pdf",
    "docx": ".docx",
    "jsonl": ".jsonl",
}


def _render(doc: _Doc, fmt: str, related: Iterable[str] = (), lang: str = "en") -> bytes:
    if fmt == "text":
        return _to_text(doc).encode("utf-8")
    if fmt == "markdown":
        return _to_markdown(doc).encode("utf-8")
    if fmt == "html":
        return _to_html(doc, related, lang).encode("utf-8")
    if fmt == "pdf":
        return _to_pdf(doc)
    if fmt == "docx":
        return _to_docx(doc)
    raise ValueError(f"cannot render a document as {fmt!r}")


# ---------------------------------------------------------------------------------------
# Planted material: other languages and low-quality pages, written here, no downloads
# ---------------------------------------------------------------------------------------

_FOREIGN: dict[str, list[tuple[str, str]]] = {
    "de": [
        (
            "Ein Nachmittag in der Stadtbibliothek",
            "Die Stadtbibliothek liegt am Rand der Altstadt, gleich neben dem alten Marktplatz. Wer an einem "
            "regnerischen Nachmittag durch die schwere Holztür tritt, hört zuerst nur das leise Rascheln von "
            "Papier und das Summen der Lampen. An den langen Tischen sitzen Schülerinnen und Schüler, die für "
            "ihre Prüfungen lernen, daneben ein älterer Herr, der jeden Tag die Zeitung liest.\n\n"
            "Im ersten Stock stehen die Bücher über Geschichte und Naturwissenschaften. Die Bibliothekarin "
            "kennt fast jedes Regal auswendig und hilft gern, wenn jemand etwas Bestimmtes sucht. Sie erzählt, "
            "dass die Sammlung im letzten Jahr um mehr als dreitausend Bände gewachsen ist, weil viele Familien "
            "ihre alten Bücher gespendet haben.\n\n"
            "Am Abend, wenn die Fenster dunkel werden, schließt die Bibliothek ihre Türen. Viele Besucher "
            "kommen am nächsten Tag wieder, denn hier finden sie Ruhe, Wissen und manchmal auch ein gutes "
            "Gespräch mit Menschen, die sie sonst nie getroffen hätten.",
        ),
        (
            "Warum wir Brot selbst backen",
            "Seit einigen Jahren backen immer mehr Menschen ihr Brot wieder selbst. Dafür braucht man nicht "
            "viel: Mehl, Wasser, Salz und etwas Geduld. Der Sauerteig muss über mehrere Tage gepflegt werden, "
            "bevor er kräftig genug ist, um einen Laib aufgehen zu lassen.\n\n"
            "Das Schöne daran ist, dass jedes Brot ein wenig anders wird. Die Temperatur in der Küche, die "
            "Sorte des Mehls und sogar die Jahreszeit verändern den Geschmack. Wer einmal ein frisches Brot aus "
            "dem eigenen Ofen gegessen hat, möchte kaum noch zum Supermarkt zurückkehren.\n\n"
            "Natürlich gelingt nicht jeder Versuch. Manchmal bleibt der Teig flach, manchmal wird die Kruste "
            "zu dunkel. Doch aus jedem Fehler lernt man etwas, und mit der Zeit wird das Backen zu einer "
            "ruhigen Gewohnheit, auf die man sich jede Woche freut.",
        ),
    ],
    "fr": [
        (
            "Une promenade au bord de la Loire",
            "Le matin, la brume se lève lentement sur la Loire et les premiers pêcheurs s'installent sur les "
            "berges. Le fleuve avance sans bruit, large et tranquille, entre les bancs de sable où se reposent "
            "les oiseaux. Les habitants du village disent que la rivière change de visage à chaque saison.\n\n"
            "En suivant le chemin de halage, on passe devant de vieilles maisons aux volets bleus et des jardins "
            "pleins de tomates et de fleurs. Une boulangerie ouvre ses portes à sept heures, et l'odeur du pain "
            "chaud attire déjà quelques cyclistes qui font une pause avant de reprendre la route.\n\n"
            "Vers midi, le soleil devient plus fort et les familles descendent vers l'eau pour pique-niquer. "
            "Les enfants cherchent des cailloux plats pour faire des ricochets, pendant que les parents "
            "discutent à l'ombre des saules. C'est une journée simple, mais on s'en souvient longtemps.",
        ),
        (
            "Apprendre à jouer du piano à quarante ans",
            "Beaucoup de gens pensent qu'il est trop tard pour apprendre un instrument après l'enfance. "
            "Pourtant, de nombreux adultes commencent le piano à quarante ou cinquante ans et y trouvent un "
            "grand plaisir. Il faut simplement accepter d'avancer lentement et de répéter souvent les mêmes "
            "exercices.\n\n"
            "Les premières semaines sont parfois difficiles, car les mains ne veulent pas obéir en même temps. "
            "Mais peu à peu, les gestes deviennent naturels et les morceaux les plus simples commencent à "
            "ressembler à de la musique. Un bon professeur sait encourager ses élèves sans les presser.\n\n"
            "Au bout d'un an, la plupart des élèves peuvent jouer quelques pièces qu'ils aiment vraiment. Ce "
            "n'est pas une question de talent, mais de patience et de régularité, et chaque petit progrès "
            "apporte une joie sincère.",
        ),
    ],
    "es": [
        (
            "El mercado de los sábados",
            "Todos los sábados por la mañana, la plaza del pueblo se llena de puestos de frutas, verduras, "
            "quesos y pan recién hecho. Los vendedores llegan antes del amanecer para montar sus mesas y colocar "
            "los productos con cuidado, porque saben que los clientes también compran con los ojos.\n\n"
            "Doña Carmen vende tomates desde hace más de treinta años y conoce a casi todos los vecinos por su "
            "nombre. Mientras pesa las naranjas, pregunta por la familia, comenta el tiempo y recomienda la "
            "mejor manera de preparar una ensalada fresca para el verano.\n\n"
            "Al mediodía, cuando el calor empieza a apretar, los puestos se recogen poco a poco. Los niños "
            "corren entre las cajas vacías y los mayores se sientan en los bancos de la plaza a conversar. El "
            "mercado no es solo un lugar para comprar, sino también un punto de encuentro para toda la comunidad.",
        ),
        (
            "Cómo cuidar las plantas en un piso pequeño",
            "Vivir en un piso pequeño no significa renunciar a las plantas. Con un poco de luz y algo de "
            "atención, es posible tener un rincón verde en la cocina o en el balcón. Lo más importante es "
            "elegir especies que se adapten bien al espacio y a la cantidad de sol que entra por la ventana.\n\n"
            "Muchas personas riegan demasiado sus plantas, y eso es un error frecuente. Antes de echar agua, "
            "conviene tocar la tierra con el dedo para comprobar si todavía está húmeda. En invierno, la mayoría "
            "de las plantas necesitan mucho menos riego que en los meses de calor.\n\n"
            "También ayuda girar las macetas de vez en cuando, para que todas las hojas reciban luz por igual. "
            "Con paciencia, las plantas crecen sanas y convierten cualquier habitación en un lugar más "
            "agradable para vivir y descansar.",
        ),
    ],
}
_FOREIGN_FORMATS = {"de": "text", "fr": "markdown", "es": "html"}

_BOILERPLATE = [
    "Click here to subscribe",
    "Accept all cookies",
    "Read our cookie policy",
    "Sign in",
    "Register",
    "Terms of use",
    "Privacy policy",
    "All rights reserved",
    "Share on social media",
    "Back to top",
    "Click here for more",
    "Log in to comment",
    "Skip to content",
    "Follow us",
    "Contact us",
]
_LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut "
    "aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum "
    "dolore eu fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui "
    "officia deserunt mollit anim id est laborum."
)
_LOREM_2 = (
    "Lorem ipsum: sed ut perspiciatis unde omnis iste natus error sit voluptatem accusantium doloremque "
    "laudantium, totam rem aperiam, eaque ipsa quae ab illo inventore veritatis et quasi architecto beatae "
    "vitae dicta sunt explicabo. Nemo enim ipsam voluptatem quia voluptas sit aspernatur aut odit aut fugit, "
    "sed quia consequuntur magni dolores eos qui ratione voluptatem sequi nesciunt. Neque porro quisquam est, "
    "qui dolorem ipsum quia dolor sit amet, consectetur, adipisci velit."
)
_REPLACEMENTS = ["value", "object", "result", "element", "entry", "record", "item", "member"]
_SHOP_ITEMS = [
    "free shipping",
    "new arrivals",
    "best sellers",
    "gift cards",
    "summer sale",
    "winter coats",
    "running shoes",
    "kitchen tools",
    "garden chairs",
    "desk lamps",
    "phone cases",
    "travel bags",
    "wool socks",
    "coffee beans",
    "yoga mats",
    "board games",
    "water bottles",
    "reading glasses",
]


def _low_quality(rng: random.Random, variant: int) -> list[tuple[str, str, str, str]]:
    """Low-quality documents as (format, name, text, rule); each variant differs in content."""
    v = f"-{variant + 1}" if variant else ""
    words = ["Coming soon. Stay tuned!", "Page under construction."][variant % 2]
    symbols = " ".join(
        rng.choice(["#####", "$$$", "%%%%", "&&", "@@@", "~~~", "^^^^", "***", "|||", "...", "<<>>", "{}{}"])
        for _ in range(120 + 40 * variant)
    )
    boiler = "\n".join(rng.choice(_BOILERPLATE) + f" {rng.randint(1, 99)}" for _ in range(40))
    bullets = "\n".join(
        f"• {rng.choice(_SHOP_ITEMS)} {rng.randint(10, 999)}" for _ in range(30 + 5 * variant)
    )
    lorem = "\n\n".join([_LOREM, _LOREM_2][variant % 2] for _ in range(4))
    line = ["Buy cheap watches online today at the best price", "Limited offer on every phone case"][
        variant % 2
    ]
    repeated = "\n".join([line] * (60 + 10 * variant))
    ellipsis = "\n".join(
        f"{rng.choice(['And then', 'So we', 'After that', 'Maybe', 'Well'])} {rng.choice(_SHOP_ITEMS)}..."
        for _ in range(40)
    )
    return [
        ("text", f"short-note{v}", words + "\n", "gopher_word_count"),
        ("text", f"symbol-soup{v}", symbols + "\n", "gopher_symbol_ratio"),
        ("text", f"site-boilerplate{v}", boiler + "\n", "c4_boilerplate_lines"),
        ("text", f"bullet-list{v}", bullets + "\n", "gopher_bullet_lines"),
        ("html", f"lorem-ipsum{v}", lorem, "c4_lorem_ipsum"),
        ("jsonl", f"repeated-lines{v}", repeated, "gopher_repetition"),
        ("text", f"ellipsis-lines{v}", ellipsis + "\n", "gopher_ellipsis_lines"),
    ]


# ---------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------


@dataclass
class _Builder:
    root: Path
    plan: _Plan
    rng: random.Random
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> content
    records: list[tuple[str, str]] = field(default_factory=list)  # JSONL (title, text)
    planted: list[PlantedItem] = field(default_factory=list)
    _taken: set[str] = field(default_factory=set)  # texts already used as a duplicate's original

    def build(self, build_key: dict[str, object]) -> CorpusInfo:
        code, references, docstrings = self._select_modules()
        topics = self._select_topics()
        self._write_code(code)
        text_docs = self._write_docs(topics, references)
        self._plant_exact_duplicates(code, text_docs)
        self._plant_near_duplicates(text_docs)
        self._plant_foreign()
        self._plant_low_quality()
        self._plant_bad_files()
        jsonl_path = self._write_jsonl(docstrings)

        for rel in sorted(self.files):
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files[rel])
        by_format = {fmt: sum(1 for rel in self.files if rel.startswith(fmt + "/")) for fmt in FORMATS}
        counts = {kind: 0 for kind in PLANTED_KINDS}
        for item in self.planted:
            counts[_KIND_COUNT[item.kind]] += 1
        bad = sum(1 for item in self.planted if item.kind == "bad_file")
        info = CorpusInfo(
            root=self.root,
            files=len(self.files),
            bytes=sum(len(data) for data in self.files.values()),
            documents=len(self.files) - bad - 1 + len(self.records),
            by_format=by_format,
            planted=counts,
        )
        manifest = {
            "build": build_key,
            "info": info.model_dump(mode="json", exclude={"root"}),
            "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(self.files.items())},
            "jsonl": jsonl_path,
            "planted": [item.model_dump() for item in self.planted],
        }
        (self.root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return info

    # -- selection ------------------------------------------------------------------------

    def _select_modules(self) -> tuple[list[_Module], list[tuple[str, _Doc]], list[tuple[str, str]]]:
        """Give each stdlib module at most one role: copied code, a reference page, or a JSONL record.

        Disjoint roles keep unplanned near duplicates out of the corpus.
        """
        plan = self.plan
        modules = _stdlib_modules()
        self.rng.shuffle(modules)
        code: list[_Module] = []
        code_bytes = 0
        quotas = dict(plan.reference_pages)
        references: list[tuple[str, _Doc]] = []
        docstrings: list[tuple[str, str]] = []
        for module in modules:
            if code_bytes < plan.code_bytes and 500 <= module.size <= plan.code_max_file:
                code.append(module)
                code_bytes += module.size
                continue
            want_ref = any(quotas.values())
            want_doc = len(docstrings) < plan.jsonl_records
            if not (want_ref or want_doc):
                if code_bytes >= plan.code_bytes:
                    break
                continue
            if module.size > plan.parse_max_file:
                continue
            try:
                tree = ast.parse(module.path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            if want_ref:
                doc = _reference_doc(module, tree)
                chars = sum(len(str(block[-1])) for block in doc.blocks)
                if 2_000 <= chars <= plan.reference_max_chars:
                    fmt = next(fmt for fmt, left in quotas.items() if left)
                    quotas[fmt] -= 1
                    references.append((fmt, doc))
                    continue
            docstring = ast.get_docstring(tree) or ""
            if want_doc and _looks_like_prose(docstring):
                docstrings.append((_module_name(module.rel), docstring))
        code.sort(key=lambda m: m.rel)
        return code, references, docstrings

    def _select_topics(self) -> list[tuple[str, _Doc]]:
        """Spread pydoc topics over the formats; PDFs get the long ones (several pages)."""
        from pydoc_data.topics import topics

        keys = sorted(topics)
        self.rng.shuffle(keys)
        quotas = dict(self.plan.topics)
        chosen: list[tuple[str, _Doc]] = []
        seen: set[str] = set()  # a few topics are aliases with the same text ("if" and "else")
        for key in keys:
            text = topics[key]
            if text in seen or len(text) > self.plan.topic_max_chars or len(text.split()) < 60:
                continue
            seen.add(text)
            for fmt, left in quotas.items():
                if left and (fmt != "pdf" or len(text) >= self.plan.pdf_min_chars):
                    quotas[fmt] -= 1
                    chosen.append((fmt, _topic_doc(key, text)))
                    break
            if not any(quotas.values()):
                break
        return chosen

    # -- regular documents ----------------------------------------------------------------

    def _write_code(self, code: list[_Module]) -> None:
        for module in code:
            self.files[_code_path(module)] = module.path.read_bytes()

    def _write_docs(self, topics: list[tuple[str, _Doc]], references: list[tuple[str, _Doc]]) -> list[str]:
        """Render topics and reference pages; returns the `.txt` paths (sources for planted copies)."""
        names = sorted(doc.name for _, doc in topics + references)
        for fmt, doc in topics + references:
            related = [names[(names.index(doc.name) + k) % len(names)] for k in (1, 2, 3)]
            self.files[f"{fmt}/{doc.name}{_EXTENSIONS[fmt]}"] = _render(doc, fmt, related)
        return sorted(rel for rel in self.files if rel.startswith("text/"))

    def _write_jsonl(self, docstrings: list[tuple[str, str]]) -> str:
        self.records = [(f"{name} module", text) for name, text in docstrings] + self.records
        rel = "jsonl/module-docstrings.jsonl"
        # Planted records were appended with their final index in mind; shift them now.
        offset = len(docstrings)
        for item in self.planted:
            if item.path == rel and item.record is not None:
                item.record += offset
        lines = [
            json.dumps({"text": text, "title": title}, ensure_ascii=False) for title, text in self.records
        ]
        self.files[rel] = ("\n".join(lines) + "\n").encode("utf-8")
        return rel

    def _add_record(self, title: str, text: str) -> int:
        """Queue a planted JSONL record; returns its index among planted records."""
        self.records.append((title, text))
        return len(self.records) - 1

    # -- planted cases --------------------------------------------------------------------

    def _plant(self, kind: str, path: str, **extra: object) -> None:
        self.planted.append(PlantedItem(kind=kind, path=path, **extra))  # type: ignore[arg-type]

    def _plant_exact_duplicates(self, code: list[_Module], text_docs: list[str]) -> None:
        """Copies under other names, and the same text in another format (a JSONL record)."""
        n = self.plan.variants
        sources = self.rng.sample(text_docs, min(len(text_docs), 2 * n))
        for i, original in enumerate(sources[:n]):
            copy = original.replace(".txt", f"-copy{i + 1}.txt")
            self.files[copy] = self.files[original]
            self._plant("exact_duplicate", copy, of=original, detail="same bytes, another name")
        for original in sources[n:]:
            index = self._add_record(Path(original).stem, self.files[original].decode("utf-8").strip())
            self._plant(
                "exact_duplicate",
                "jsonl/module-docstrings.jsonl",
                record=index,
                of=original,
                detail="the .txt text as a JSONL record",
            )
        for original in sorted(self.rng.sample(code, n), key=lambda m: m.rel):
            name = _code_path(original)
            copy = name.replace(".py", "_backup.py")
            self.files[copy] = self.files[name]
            self._plant("exact_duplicate", copy, of=name, detail="same bytes, another name")
        pages = sorted(rel for rel in self.files if rel.startswith(("html/", "docx/")))
        for original in self.rng.sample(pages, n):
            stem, ext = original.rsplit(".", 1)
            copy = f"{stem}-mirror.{ext}"
            self.files[copy] = self.files[original]
            self._plant("exact_duplicate", copy, of=original, detail="same bytes, another name")
        self._taken = set(sources)

    def _plant_near_duplicates(self, text_docs: list[str]) -> None:
        """Copies with a few words changed, or a line added: word 5-gram Jaccard well above 0.8."""
        candidates = [
            rel for rel in text_docs if rel not in self._taken and len(self.files[rel].split()) >= 400
        ]
        markdown = sorted(
            rel for rel in self.files if rel.startswith("markdown/") and len(self.files[rel].split()) >= 400
        )
        picks = self.rng.sample(candidates, min(len(candidates), self.plan.variants))
        for original in picks:
            text = self.files[original].decode("utf-8")
            words = text.split(" ")
            for position in self.rng.sample(range(len(words)), max(2, len(words) // 400)):
                if words[position].isalpha():
                    words[position] = self.rng.choice(_REPLACEMENTS)
            changed = " ".join(words)
            copy = original.replace(".txt", "-revised.txt")
            self.files[copy] = changed.encode("utf-8")
            self._plant(
                "near_duplicate",
                copy,
                of=original,
                detail=f"words changed; jaccard={shingle_jaccard(text, changed):.3f}",
            )
        for original in self.rng.sample(markdown, min(len(markdown), self.plan.variants)):
            text = self.files[original].decode("utf-8")
            lines = text.split("\n")
            at = self.rng.randrange(len(lines) // 3, len(lines))
            lines.insert(at, "\nNote: this page was reviewed for the current release of the language.\n")
            changed = "\n".join(lines)
            copy = original.replace(".md", "-draft.md")
            self.files[copy] = changed.encode("utf-8")
            self._plant(
                "near_duplicate",
                copy,
                of=original,
                detail=f"a line added; jaccard={shingle_jaccard(text, changed):.3f}",
            )

    def _plant_foreign(self) -> None:
        for lang, texts in _FOREIGN.items():
            for variant, (title, body) in enumerate(texts[: self.plan.variants]):
                doc = _Doc(
                    name=f"{lang}-{_slug(title)}",
                    title=title,
                    blocks=[("p", para) for para in body.split("\n\n")],
                    plain=f"{title}\n\n{body}\n",
                )
                fmt = _FOREIGN_FORMATS[lang] if variant == 0 else "docx"
                if fmt == "html":
                    data = _to_html(doc, lang=lang).encode("utf-8")
                else:
                    data = _render(doc, fmt)
                rel = f"{fmt}/{doc.name}{_EXTENSIONS[fmt]}"
                self.files[rel] = data
                self._plant("non_english", rel, detail=lang)

    def _plant_low_quality(self) -> None:
        for variant in range(self.plan.variants):
            for fmt, name, text, rule in _low_quality(self.rng, variant):
                if fmt == "jsonl":
                    index = self._add_record(name, text)
                    self._plant("low_quality", "jsonl/module-docstrings.jsonl", record=index, detail=rule)
                    continue
                if fmt == "html":
                    doc = _Doc(name=name, title="Welcome", blocks=[("p", p) for p in text.split("\n\n")])
                    data = _to_html(doc).encode("utf-8")
                else:
                    data = text.encode("utf-8")
                rel = f"{fmt}/{name}{_EXTENSIONS[fmt]}"
                self.files[rel] = data
                self._plant("low_quality", rel, detail=rule)

    def _plant_bad_files(self) -> None:
        """Files ingest must quarantine: a PDF cut short with garbage inside, binary bytes named `.txt`."""
        garbage = bytes(self.rng.getrandbits(8) for _ in range(2048))
        self.files["pdf/broken-report.pdf"] = (
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog" + garbage
        )
        blob = bytearray(b"\x7fELF\x02\x01\x01\x00" + bytes(8))
        for _ in range(4096):
            blob.append(0 if self.rng.random() < 0.3 else self.rng.getrandbits(8))
        self.files["text/data-export.txt"] = bytes(blob)
        self._plant("bad_file", "pdf/broken-report.pdf", detail="truncated PDF, no xref or trailer")
        self._plant("bad_file", "text/data-export.txt", detail="binary bytes named .txt")


def _code_path(module: _Module) -> str:
    """code/<dotted module name>.py: flat, readable, and unique (`email/utils.py` -> `email.utils.py`)."""
    return f"code/{_module_name(module.rel)}.py"


def _slug(title: str) -> str:
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-")


def _looks_like_prose(text: str) -> bool:
    """Long enough and wordy enough that quality rules should keep it (real docs, not planted)."""
    words = text.split()
    if len(words) < 60:
        return False
    alpha = sum(1 for word in words if any(ch.isalpha() for ch in word))
    return alpha / len(words) >= 0.85


def iter_corpus_files(root: Path) -> Iterator[Path]:
    """The raw files of a built corpus in sorted order, `.corpus.json` left out."""
    root = Path(root)
    for fmt in FORMATS:
        folder = root / fmt
        if folder.is_dir():
            yield from sorted(p for p in folder.rglob("*") if p.is_file())
