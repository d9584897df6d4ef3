"""The bundled sample corpus: every format readable, every planted case present, same bytes each build."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from itertools import combinations
from pathlib import Path

import docx
import py3langid
import pypdf
import pytest
from bs4 import BeautifulSoup

from refinery.sample_corpus import (
    FORMATS,
    MANIFEST_NAME,
    PLANTED_KINDS,
    CorpusInfo,
    build_sample_corpus,
    iter_corpus_files,
    planted_items,
    shingle_jaccard,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_sample_corpus(tmp_path_factory.mktemp("corpus") / "tiny", "tiny")


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _text_of(root: Path, ref: str) -> str:
    """Extracted text of `path` or `path#record`, the way a reader of each format would get it."""
    path, _, record = ref.partition("#")
    file = root / path
    fmt = path.split("/")[0]
    if fmt == "jsonl":
        return json.loads(file.read_text(encoding="utf-8").splitlines()[int(record)])["text"]
    if fmt == "html":
        return BeautifulSoup(file.read_bytes(), "lxml").find("article").get_text(" ")
    if fmt == "pdf":
        return "\n".join(page.extract_text() for page in pypdf.PdfReader(file).pages)
    if fmt == "docx":
        return "\n".join(paragraph.text for paragraph in docx.Document(str(file)).paragraphs)
    return file.read_text(encoding="utf-8")


def _ref(item) -> str:
    return item.path if item.record is None else f"{item.path}#{item.record}"


def test_tiny_covers_every_format_and_planted_kind(tiny: CorpusInfo) -> None:
    assert set(tiny.by_format) == set(FORMATS)
    assert all(count >= 1 for count in tiny.by_format.values()), tiny.by_format
    assert set(tiny.planted) == set(PLANTED_KINDS)
    assert all(count >= 1 for count in tiny.planted.values()), tiny.planted
    assert tiny.planted["bad_files"] == 2
    assert 60 <= tiny.documents <= 150
    assert tiny.bytes < 400_000
    files = list(iter_corpus_files(tiny.root))
    assert len(files) == tiny.files == sum(tiny.by_format.values())
    assert sum(p.stat().st_size for p in files) == tiny.bytes
    kinds = Counter(item.kind for item in planted_items(tiny.root))
    assert kinds["exact_duplicate"] == tiny.planted["exact_duplicates"]
    assert kinds["near_duplicate"] == tiny.planted["near_duplicates"]
    assert kinds["low_quality"] == tiny.planted["low_quality"]
    assert kinds["non_english"] == tiny.planted["non_english"]
    assert kinds["bad_file"] == tiny.planted["bad_files"]


def test_same_bytes_on_every_build(tiny: CorpusInfo, tmp_path: Path) -> None:
    again = build_sample_corpus(tmp_path / "again", "tiny")
    assert _hashes(again.root) == _hashes(tiny.root)
    assert again.model_dump(exclude={"root"}) == tiny.model_dump(exclude={"root"})
    other_seed = build_sample_corpus(tmp_path / "seed1", "tiny", seed=1)
    assert _hashes(other_seed.root) != _hashes(tiny.root)


def test_metadata_carries_no_build_time(tiny: CorpusInfo) -> None:
    for path in (tiny.root / "docx").glob("*.docx"):
        with zipfile.ZipFile(path) as archive:
            assert {info.date_time for info in archive.infolist()} == {(2024, 1, 1, 0, 0, 0)}
        assert docx.Document(str(path)).core_properties.created.year == 2024
    for path in (tiny.root / "pdf").glob("*.pdf"):
        if path.name != "broken-report.pdf":
            assert pypdf.PdfReader(path).metadata["/CreationDate"].startswith("D:20240101")


def test_rebuild_is_a_no_op_and_refuses_foreign_folders(tiny: CorpusInfo, tmp_path: Path) -> None:
    marker = tiny.root / MANIFEST_NAME
    before = marker.stat().st_mtime_ns
    assert build_sample_corpus(tiny.root, "tiny") == tiny
    assert marker.stat().st_mtime_ns == before

    stale = build_sample_corpus(tmp_path / "c", "tiny", seed=3)
    rebuilt = build_sample_corpus(stale.root, "tiny", seed=4)  # another build of ours: replaced
    assert json.loads((rebuilt.root / MANIFEST_NAME).read_text())["build"]["seed"] == 4

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="new or empty folder"):
        build_sample_corpus(foreign, "tiny")
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="size must be one of"):
        build_sample_corpus(tmp_path / "x", "huge")  # type: ignore[arg-type]
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_format_reads_with_its_library(tiny: CorpusInfo) -> None:
    root = tiny.root
    bad = {item.path for item in planted_items(root) if item.kind == "bad_file"}
    for path in (root / "code").glob("*.py"):
        compile(path.read_bytes(), str(path), "exec")
    markdown = [p.read_text(encoding="utf-8") for p in (root / "markdown").glob("*.md")]
    assert all(text.startswith("# ") for text in markdown)
    assert any("\n## " in text for text in markdown) and any("\n```" in text for text in markdown)
    for path in (root / "html").glob("module-*.html"):
        soup = BeautifulSoup(path.read_bytes(), "lxml")
        for tag in ("nav", "header", "footer", "script", "article", "main"):
            assert soup.find(tag) is not None, (path.name, tag)
        assert len(soup.find("article").get_text(" ").split()) > 100
    pdfs = [p for p in (root / "pdf").glob("*.pdf") if f"pdf/{p.name}" not in bad]
    assert pdfs
    for path in pdfs:
        reader = pypdf.PdfReader(path)
        assert len(reader.pages) >= 2, path.name
        assert len(_text_of(root, f"pdf/{path.name}").split()) > 300
    for path in (root / "docx").glob("*.docx"):
        assert len(_text_of(root, f"docx/{path.name}").split()) > 50
    lines = (root / "jsonl" / "module-docstrings.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert all(set(record) == {"text", "title"} and record["text"] for record in records)


def test_exact_duplicates_extract_to_identical_text(tiny: CorpusInfo) -> None:
    root = tiny.root
    dupes = [item for item in planted_items(root) if item.kind == "exact_duplicate"]
    assert any(item.record is not None for item in dupes), "one duplicate should cross formats"
    for item in dupes:
        assert item.of and (root / item.of.partition("#")[0]).is_file()
        if item.record is None:
            assert (root / item.path).read_bytes() == (root / item.of).read_bytes()
        else:
            assert _text_of(root, _ref(item)).strip() == _text_of(root, item.of).strip()


def test_near_duplicates_are_near_but_not_equal(tiny: CorpusInfo) -> None:
    root = tiny.root
    near = [item for item in planted_items(root) if item.kind == "near_duplicate"]
    assert {item.path.split("/")[0] for item in near} >= {"text", "markdown"}
    for item in near:
        a, b = _text_of(root, _ref(item)), _text_of(root, item.of or "")
        assert a != b
        assert 0.85 < shingle_jaccard(a, b) < 1.0
        assert f"jaccard={shingle_jaccard(b, a):.3f}" in item.detail


def test_no_unplanned_duplicates(tiny: CorpusInfo) -> None:
    """Only planted pairs are similar, so dedup's drop counts can be checked exactly."""
    root = tiny.root
    items = planted_items(root)
    planted_pairs = {frozenset((_ref(item), item.of)) for item in items if item.of}
    bad = {item.path for item in items if item.kind == "bad_file"}
    refs = [p.relative_to(root).as_posix() for p in iter_corpus_files(root)]
    refs = [ref for ref in refs if ref not in bad and not ref.endswith(".jsonl")]
    n_records = len((root / "jsonl" / "module-docstrings.jsonl").read_text().splitlines())
    refs += [f"jsonl/module-docstrings.jsonl#{i}" for i in range(n_records)]
    texts = {ref: _text_of(root, ref) for ref in refs}
    for a, b in combinations(refs, 2):
        if frozenset((a, b)) not in planted_pairs:
            assert shingle_jaccard(texts[a], texts[b]) < 0.5, (a, b)


def test_low_quality_documents_trip_their_rules(tiny: CorpusInfo) -> None:
    root = tiny.root
    low = {
        item.detail: _text_of(root, _ref(item)) for item in planted_items(root) if item.kind == "low_quality"
    }
    assert len(low["gopher_word_count"].split()) < 50
    soup = low["gopher_symbol_ratio"]
    assert (soup.count("#") + soup.count("...")) / len(soup.split()) > 0.1
    lines = low["gopher_bullet_lines"].splitlines()
    assert sum(line.startswith("•") for line in lines) / len(lines) > 0.9
    assert "lorem ipsum" in low["c4_lorem_ipsum"].lower()
    lines = low["gopher_repetition"].splitlines()
    assert 1 - len(set(lines)) / len(lines) > 0.3
    lines = low["gopher_ellipsis_lines"].splitlines()
    assert sum(line.endswith("...") for line in lines) / len(lines) > 0.3
    boiler = low["c4_boilerplate_lines"].lower()
    assert "cookie" in boiler or "click here" in boiler or "terms of use" in boiler


def test_other_languages_are_identified(tiny: CorpusInfo) -> None:
    root = tiny.root
    foreign = [item for item in planted_items(root) if item.kind == "non_english"]
    assert {item.detail for item in foreign} == {"de", "fr", "es"}
    for item in foreign:
        assert py3langid.classify(_text_of(root, _ref(item)))[0] == item.detail
    english = _text_of(
        root, next(p.relative_to(root).as_posix() for p in (root / "text").glob("topic-*.txt"))
    )
    assert py3langid.classify(english)[0] == "en"


def test_bad_files_do_not_parse(tiny: CorpusInfo) -> None:
    root = tiny.root
    with pytest.raises(Exception):  # noqa: B017 - any parse error will do; ingest quarantines them all
        [
            page.extract_text()
            for page in pypdf.PdfReader(root / "pdf" / "broken-report.pdf", strict=True).pages
        ]
    blob = (root / "text" / "data-export.txt").read_bytes()
    assert b"\x00" in blob
    with pytest.raises(UnicodeDecodeError):
        blob.decode("utf-8")


def test_default_size(tmp_path: Path) -> None:
    info = build_sample_corpus(tmp_path / "default")
    assert 3_000_000 <= info.bytes <= 6_500_000
    assert info.by_format["code"] > 50 and info.by_format["html"] > 30
    assert info.planted["near_duplicates"] >= 4 and info.planted["low_quality"] >= 10
    assert info.documents > 250
