"""The ingest stage over every good format and every kind of bad input, in one folder."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from refinery.storage.documents import DOCUMENT_SCHEMA, QUARANTINE_SCHEMA, document_files, read_table
from refinery.tasks.ingest import INDEX_FILE, QUARANTINE_FILE, IngestConfig, ocr_status, run_ingest
from refinery.tasks.ingest.sources import local_uri
from refinery.tasks.ingest.stage import file_of

HAS_OCR = ocr_status(IngestConfig())[0] and shutil.which("pdftoppm") is not None
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PROSE = "Refinery reads raw documents. Every good file becomes a document with text. "
EMAIL = ("From: Ada <ada@example.com>\nTo: team@example.com\nSubject: Weekly data report\n"
         "Content-Type: text/plain\n\nThe crawl finished. Ten thousand pages were ingested.\n")


# -- builders of small real files -------------------------------------------------------------


def text_png(text: str) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (900, 120), "white")
    ImageDraw.Draw(img).text((20, 30), text, fill="black", font=ImageFont.load_default(size=48))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_pdf(path: Path, text: str | None, encrypt: bool = False, image: bytes | None = None) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    if text:
        pdf.set_title("A test PDF")
    for page in range(2):
        pdf.add_page()
        pdf.set_font("helvetica", size=12)
        if text:
            pdf.multi_cell(0, 10, f"Page {page + 1}. {text}")
        elif image:
            pdf.image(io.BytesIO(image), x=10, y=10, w=180)
    if encrypt:
        pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.output(str(path))


def make_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    d.add_heading("Quarterly report", 0)
    d.add_paragraph(PROSE * 2)
    table = d.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "cell one"
    table.rows[0].cells[1].text = "cell two"
    d.save(str(path))


def make_pptx(path: Path) -> None:
    from pptx import Presentation

    prs = Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[1])
    slide.shapes.title.text = "Deck title"
    slide.placeholders[1].text = "A bullet about refining data"
    prs.save(str(path))


def make_warc(path: Path) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        pages = [
            ("http://example.com/a", "text/html; charset=utf-8",
             b"<html><head><title>A</title></head><body><nav>Home</nav><p>First crawled page text.</p></body></html>"),
            ("http://example.com/b", "text/html", b"<html><body><article><p>Second page body.</p></article></body></html>"),
            ("http://example.com/logo.png", "image/png", b"\x89PNG\r\n\x1a\n0000"),
        ]
        for url, ctype, body in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers))


def build_corpus(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write every case; returns ({name: format} of good files, {name: reason} of bad ones)."""
    good: dict[str, str] = {}
    bad: dict[str, str] = {}

    def put(name: str, data: bytes | str) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    # good files, one or more per format
    put("good.txt", PROSE)
    good["good.txt"] = "text"
    put("utf16.txt", "UTF-16 text: naïve café ✓".encode("utf-16"))
    good["utf16.txt"] = "text"
    put("latin1.txt", "Ceci est du texte déjà encodé en Latin-1, très ancien.".encode("latin-1"))
    good["latin1.txt"] = "text"
    put("src/hello.py", "def hello():\n    return 'world'\n")
    good["src/hello.py"] = "code"
    put("src/main.go", "package main\n\nfunc main() {}\n")
    good["src/main.go"] = "code"
    put("src/lib.rs", "pub fn add(a: i32, b: i32) -> i32 { a + b }\n")
    good["src/lib.rs"] = "code"
    put("README.md", "# Refinery\n\nSome *markdown* text.\n")
    good["README.md"] = "markdown"
    put("page.html", "<html><head><title>Page</title><script>var tracking = 1;</script></head><body>"
        "<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav><main><h1>Main heading</h1>"
        "<p>The main content paragraph.</p></main><footer>Copyright footer</footer></body></html>")
    good["page.html"] = "html"
    make_pdf(root / "doc.pdf", PROSE)
    good["doc.pdf"] = "pdf"
    make_docx(root / "doc.docx")
    good["doc.docx"] = "docx"
    make_pptx(root / "deck.pptx")
    good["deck.pptx"] = "pptx"
    put("mail.eml", EMAIL)
    good["mail.eml"] = "text"
    put("notes.txt.gz", gzip.compress(PROSE.encode()))
    good["notes.txt.gz"] = "text"
    lines = [json.dumps({"text": f"record {i} {PROSE}", "url": f"http://x/{i}"}) for i in range(3)]
    put("data.jsonl", "\n".join(lines[:2] + ["{not json", json.dumps({"body": "no text field"}), lines[2]]) + "\n")
    good["data.jsonl"] = "jsonl"
    put("data.jsonl.gz", gzip.compress("\n".join(lines).encode()))
    good["data.jsonl.gz"] = "jsonl"
    put("data.jsonl.zst", zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    good["data.jsonl.zst"] = "jsonl"
    put("array.json", json.dumps([{"text": "first element"}, {"text": "second element"}]))
    good["array.json"] = "jsonl"
    pq.write_table(pa.table({"text": ["row zero text", None, "row two text"], "n": [0, 1, 2]}), root / "table.parquet")
    good["table.parquet"] = "parquet"
    make_warc(root / "crawl.warc.gz")
    good["crawl.warc.gz"] = "warc"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("inner/a.txt", PROSE)
        z.writestr("inner/b.md", "# Inside a zip\n\ntext")
        z.writestr("../evil.txt", "escape attempt")
    put("bundle.zip", zbuf.getvalue())
    good["bundle.zip"] = "text"
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as t:
        for name, body in (("c.txt", PROSE.encode()), ("d.py", b"print('tar')\n")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    put("bundle.tar.gz", tbuf.getvalue())
    good["bundle.tar.gz"] = "text"
    put("huge.txt", b"a" * (50 * 2**20))
    good["huge.txt"] = "text"  # 50 MB on a single line
    weird = os.fsdecode(b"weird\nname\xff.txt")
    put(weird, PROSE)
    good[weird] = "text"
    img = text_png("HELLO OCR WORLD")
    put("scan.png", img)
    if HAS_OCR:
        good["scan.png"] = "image"
    else:
        bad["scan.png"] = "ocr_unavailable"
    make_pdf(root / "scanned.pdf", None, image=img)
    if HAS_OCR:
        good["scanned.pdf"] = "pdf"
    else:
        bad["scanned.pdf"] = "no_text_layer"

    # bad files
    put("empty.txt", b"")
    bad["empty.txt"] = "empty"
    put("binary.txt", bytes(range(256)) * 64)
    bad["binary.txt"] = "binary"
    put("truncated.txt.gz", gzip.compress(PROSE.encode() * 50)[:-30])
    bad["truncated.txt.gz"] = "truncated"
    zst = zstandard.ZstdCompressor().compress("".join(f'{{"text": "line {i}"}}\n' for i in range(5000)).encode())
    put("truncated.jsonl.zst", zst[: len(zst) // 2])
    bad["truncated.jsonl.zst"] = "truncated"
    put("corrupt.pdf", b"%PDF-1.4\n1 0 obj garbage garbage\n%%EOF\x00\xff")
    bad["corrupt.pdf"] = "corrupt"
    make_pdf(root / "encrypted.pdf", PROSE, encrypt=True)
    bad["encrypted.pdf"] = "encrypted"
    put("notzip.docx", b"this is not a zip container")
    bad["notzip.docx"] = "corrupt"
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.txt", b"\0" * (12 * 2**20))
    put("bomb.zip", bomb.getvalue())
    bad["bomb.zip"] = "decompression_limit"
    put("bomb.jsonl.gz", gzip.compress(b"\n" * (12 * 2**20)))  # a gzip bomb is named as such, not "corrupt"
    bad["bomb.jsonl.gz"] = "decompression_limit"
    put("scripts.html", "<html><head><script>alert(1)</script></head><body><script>x()</script></body></html>")
    bad["scripts.html"] = "no_text"
    put("blob.xyz", os.urandom(4096) + b"\0")
    bad["blob.xyz"] = "unsupported_format"
    with open(root / "too_big.txt", "wb") as f:  # sparse: big on paper, nothing read
        f.truncate(70 * 2**20)
    bad["too_big.txt"] = "too_large"
    os.symlink("loop.txt", root / "loop.txt")
    bad["loop.txt"] = "symlink_loop"
    (root / "sub").mkdir()
    put("sub/inside.txt", PROSE)
    good["sub/inside.txt"] = "text"
    os.symlink("..", root / "sub" / "back")
    bad["sub/back"] = "symlink_loop"
    os.symlink("no-such-target.txt", root / "dangling.txt")
    bad["dangling.txt"] = "unreadable"
    os.mkfifo(root / "pipe.txt")
    bad["pipe.txt"] = "not_a_regular_file"
    locked = put("locked.txt", PROSE)
    locked.chmod(0)
    if IS_ROOT:  # root reads any file; the permission check can only show as a non-root user
        good["locked.txt"] = "text"
    else:
        bad["locked.txt"] = "unreadable"
    put(".hidden/secret.txt", "excluded by the default globs")
    return good, bad


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("raw")
    good, bad = build_corpus(root)
    cfg = IngestConfig(max_file_bytes=60 * 2**20, max_decompressed_bytes=8 * 2**20, workers=1)
    stage = tmp_path_factory.mktemp("run") / "ingest"
    result = run_ingest([str(root)], stage, cfg, progress=False)
    yield root, good, bad, stage, result
    (root / "locked.txt").chmod(0o644)


def uri(root: Path, name: str) -> str:
    return local_uri(str(root / name))


def test_outputs_follow_the_contracts(ingested) -> None:
    root, good, bad, stage, result = ingested
    docs = read_table(document_files(stage))
    assert docs.schema == DOCUMENT_SCHEMA
    assert pq.read_schema(stage / QUARANTINE_FILE) == QUARANTINE_SCHEMA
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in docs.column("id").to_pylist())
    assert len(set(docs.column("id").to_pylist())) == docs.num_rows
    for meta in docs.column("meta").to_pylist():
        assert isinstance(json.loads(meta), dict)
    listed = {o.path for o in result.outputs}
    assert {"part-00000.parquet", QUARANTINE_FILE, INDEX_FILE} <= listed
    assert not (stage / ".previous").exists()
    result.counts.check("ingest")
    quarantine = pq.read_table(stage / QUARANTINE_FILE)
    by_reason: dict[str, int] = {}
    for reason in quarantine.column("reason").to_pylist():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert result.counts.dropped == by_reason
    assert result.counts.kept == docs.num_rows


def test_every_good_file_is_ingested_with_its_format(ingested) -> None:
    root, good, bad, stage, result = ingested
    docs = read_table(document_files(stage)).to_pylist()
    files = {sf for sf in pq.read_table(stage / INDEX_FILE).column("source").to_pylist()}
    by_file: dict[str, list[dict]] = {}
    for d in docs:
        by_file.setdefault(file_of(d["source"], files), []).append(d)
    for name, fmt in good.items():
        rows = by_file.get(uri(root, name))
        assert rows, f"{name!r} produced no document"
        assert fmt in {r["format"] for r in rows}, (name, {r["format"] for r in rows})
        assert all(r["text"].strip() for r in rows)


def test_text_and_metadata_are_right(ingested) -> None:
    root, good, bad, stage, result = ingested
    docs = {d["source"]: d for d in read_table(document_files(stage)).to_pylist()}
    assert docs[uri(root, "utf16.txt")]["text"] == "UTF-16 text: naïve café ✓"
    assert "déjà encodé" in docs[uri(root, "latin1.txt")]["text"]
    assert json.loads(docs[uri(root, "src/lib.rs")]["meta"])["language"] == "rust"
    html = docs[uri(root, "page.html")]["text"]
    assert "main content paragraph" in html and "Main heading" in html
    assert "tracking" not in html and "About" not in html and "Copyright" not in html
    pdf = docs[uri(root, "doc.pdf")]
    assert json.loads(pdf["meta"])["pages"] == 2 and "Every good file" in pdf["text"]
    assert "Quarterly report" in docs[uri(root, "doc.docx")]["text"]
    assert "cell two" in docs[uri(root, "doc.docx")]["text"]
    assert "refining data" in docs[uri(root, "deck.pptx")]["text"]
    assert json.loads(docs[uri(root, "deck.pptx")]["meta"]) == {"slides": 1, "title": "Deck title"}
    mail = docs[uri(root, "mail.eml")]
    assert "Ten thousand pages" in mail["text"] and json.loads(mail["meta"])["subject"] == "Weekly data report"
    assert len(docs[uri(root, "huge.txt")]["text"]) == 50 * 2**20
    assert docs[uri(root, "huge.txt")]["bytes"] == 50 * 2**20
    warc = [d for s, d in docs.items() if s.startswith(uri(root, "crawl.warc.gz") + "#")]
    assert {json.loads(d["meta"])["url"] for d in warc} == {"http://example.com/a", "http://example.com/b"}
    assert all(json.loads(d["meta"])["date"] for d in warc)
    assert "Home" not in warc[0]["text"]
    jsonl = sorted((s, d["text"]) for s, d in docs.items() if s.startswith(uri(root, "data.jsonl") + "#"))
    assert [s.rsplit("#", 1)[1] for s, _ in jsonl] == ["0", "1", "4"]  # record position = line index
    assert json.loads(docs[uri(root, "data.jsonl") + "#0"]["meta"])["url"] == "http://x/0"
    zipped = [d for s, d in docs.items() if s.startswith(uri(root, "bundle.zip") + "#")]
    assert {json.loads(d["meta"])["member"] for d in zipped} == {"inner/a.txt", "inner/b.md"}
    if HAS_OCR:
        assert "OCR" in docs[uri(root, "scan.png")]["text"].upper()
        assert "OCR" in docs[uri(root, "scanned.pdf")]["text"].upper()
    assert not any(".hidden" in s for s in docs)


def test_every_bad_input_is_quarantined_with_its_reason(ingested) -> None:
    root, good, bad, stage, result = ingested
    rows = pq.read_table(stage / QUARANTINE_FILE).to_pylist()
    reasons = {r["source"]: r["reason"] for r in rows}
    for name, reason in bad.items():
        assert reasons.get(uri(root, name)) == reason, (name, reasons.get(uri(root, name)))
    assert all(r["error"] for r in rows)
    # record-level problems keep the file's good records
    assert reasons[uri(root, "data.jsonl") + "#2"] == "invalid_json"
    assert reasons[uri(root, "data.jsonl") + "#3"] == "missing_text_field"
    assert reasons[uri(root, "table.parquet") + "#1"] == "missing_text_field"
    assert [r["reason"] for r in rows if r["source"].startswith(uri(root, "bundle.zip"))] == ["unsafe_path"]
    assert [r["reason"] for r in rows if r["source"].startswith(uri(root, "crawl.warc.gz"))] == ["unsupported_format"]
    if not HAS_OCR:
        error = next(r["error"] for r in rows if r["source"] == uri(root, "scan.png"))
        assert "apt-get install tesseract-ocr" in error
    assert not (root.parent / "evil.txt").exists() and not (stage.parent / "evil.txt").exists()


def test_files_seen_equal_documents_plus_quarantine(ingested) -> None:
    root, good, bad, stage, result = ingested
    index = pq.read_table(stage / INDEX_FILE).to_pylist()
    files = {r["source"] for r in index}
    doc_files = {file_of(s, files) for s in read_table(document_files(stage)).column("source").to_pylist()}
    q_files = {file_of(s, files) for s in pq.read_table(stage / QUARANTINE_FILE).column("source").to_pylist()}
    assert files == doc_files | q_files
    assert files == {uri(root, n) for n in [*good, *bad]}
    assert result.metrics["files"] == len(files)
    assert result.metrics["files_new"] + result.metrics["files_unlisted_errors"] == len(files)


def test_ocr_branches_without_tesseract(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "scan.png").write_bytes(text_png("NO OCR HERE"))
    missing = run_ingest([str(tmp_path / "raw")], tmp_path / "a", IngestConfig(tesseract_cmd="no-such-tesseract"), progress=False)
    off = run_ingest([str(tmp_path / "raw")], tmp_path / "b", IngestConfig(ocr=False), progress=False)
    assert missing.counts.dropped == {"ocr_unavailable": 1}
    assert off.counts.dropped == {"ocr_disabled": 1}
    error = pq.read_table(tmp_path / "a" / QUARANTINE_FILE).column("error")[0].as_py()
    assert "install" in error and "tesseract" in error.lower()


def test_per_file_time_limit_quarantines_slow_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    # A document file (HTML) is parsed whole, under the per-file limit; a JSON array and JSON Lines
    # are datasets, streamed by record with no per-file time limit, so all their records come through.
    records = [{"text": f"line {i}"} for i in range(100_000)]
    (raw / "slow.html").write_text("<html><body>" + "".join(f"<p>paragraph {i}</p>" for i in range(100_000))
                                   + "</body></html>")  # fmt: skip
    (raw / "array.json").write_text(json.dumps(records))
    (raw / "streamed.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (raw / "fast.txt").write_text(PROSE)
    cfg = IngestConfig(file_timeout_s=0.05, workers=1)
    result = run_ingest([str(raw)], tmp_path / "ingest", cfg, progress=False)
    assert result.counts.dropped == {"timeout": 1}
    assert result.counts.kept == 1 + 2 * len(records)
    row = pq.read_table(tmp_path / "ingest" / QUARANTINE_FILE).to_pylist()[0]
    assert row["source"] == local_uri(str(raw / "slow.html"))


def test_unstructured_readers_work_with_the_network_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during ingest")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    make_docx(tmp_path / "a.docx")
    make_pptx(tmp_path / "b.pptx")
    (tmp_path / "c.html").write_text("<html><body><p>Offline HTML.</p></body></html>")
    (tmp_path / "d.eml").write_text(EMAIL)
    cfg = IngestConfig(include=["*.docx", "*.pptx", "*.html", "*.eml"], office_reader="unstructured", workers=1)
    result = run_ingest([str(tmp_path)], tmp_path / "out", cfg, progress=False)
    assert result.counts.dropped == {}
    docs = read_table(document_files(tmp_path / "out")).to_pylist()
    assert sorted(d["format"] for d in docs) == ["docx", "html", "pptx", "text"]
    assert all(json.loads(d["meta"]).get("reader") == "unstructured" for d in docs if d["format"] != "html")
    direct = run_ingest([str(tmp_path)], tmp_path / "direct", IngestConfig(include=["*.docx", "*.pptx"], workers=1),
                        progress=False)
    assert direct.counts.kept == 2
    for d in read_table(document_files(tmp_path / "direct")).to_pylist():  # same words either way
        twin = next(u for u in docs if u["source"] == d["source"])
        assert set(d["text"].split()) == set(twin["text"].split())
    from unstructured.nlp import tokenize

    from refinery.tasks.ingest import offline_nlp_enabled
    from refinery.tasks.ingest.offline_nlp import blank_english

    assert offline_nlp_enabled() and tokenize._get_nlp is blank_english
    assert [s for s in tokenize.sent_tokenize("One sentence. Another one.")] == ["One sentence.", "Another one."]


def test_archives_stay_inside_and_nest(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("deep.txt", "nested zip text")
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as t:
        for name, body in (("ok.txt", b"tar member text"), ("../up.txt", b"x"), ("/abs.txt", b"y"),
                           ("inner.zip", inner.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    (raw / "bundle.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tbuf.getvalue()))
    result = run_ingest([str(raw)], tmp_path / "out", IngestConfig(workers=1), progress=False)
    docs = {json.loads(d["meta"])["member"]: d["text"] for d in read_table(document_files(tmp_path / "out")).to_pylist()}
    assert docs == {"ok.txt": "tar member text", "inner.zip/deep.txt": "nested zip text"}
    assert result.counts.dropped == {"unsafe_path": 3}
    assert not (tmp_path / "up.txt").exists() and not Path("/abs.txt").exists()


def test_html_main_content_survives_boilerplate_classes() -> None:
    from refinery.tasks.ingest.formats.html import html_to_text

    page = ("<html><head><title>T</title></head><body><header>Site banner</header>"
            "<div class='layout has-sidebar'><p>" + PROSE * 5 + "</p>"
            "<div class='sidebar'>Related links</div><div hidden>secret</div></div>"
            "<div id='cookie-banner'>We use cookies</div></body></html>")
    text, title = html_to_text(page.encode())
    assert title == "T"
    assert PROSE.strip() in text
    assert not any(junk in text for junk in ("Site banner", "Related links", "secret", "cookies"))
