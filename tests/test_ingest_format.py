"""A new ingest format is one module plus one registration: the `.rec` format of `rec_format`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rec_format import REC, read_rec

from refinery.storage.documents import document_files, read_table
from refinery.tasks.ingest import INDEX_FILE, QUARANTINE_FILE, Format, IngestConfig, registered, run_ingest
from refinery.tasks.ingest.formats import FORMATS, detect, register_format
from refinery.tasks.ingest.sources import local_uri


def test_a_registered_format_is_detected_read_and_quarantined(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.rec").write_text("%%rec\nfirst record\n%%\nsecond\nrecord\n%%\n  \n%%\nthird\n")
    (raw / "headless.rec").write_text("first record\n%%\n")  # malformed: no %%rec line
    (raw / "latin1.rec").write_bytes("%%rec\ncaf\xe9\n".encode("latin-1"))  # malformed: not UTF-8
    (raw / "notes.dat").write_text("%%rec\nclaimed by its content\n")  # no format claims .dat by name
    (raw / "plain.txt").write_text("The other formats still work.")
    out = tmp_path / "ingest"

    with registered(REC):  # the one registration line, scoped to this test
        result = run_ingest([str(raw)], out, IngestConfig(workers=1), progress=False)

    def uri(name: str, pos: int | None = None) -> str:
        return local_uri(str(raw / name)) + ("" if pos is None else f"#{pos}")

    docs = read_table(document_files(out)).to_pylist()
    recs = sorted((d["source"], d["text"], json.loads(d["meta"])["record"]) for d in docs if d["format"] == "rec")
    assert recs == sorted([(uri("good.rec", 0), "first record", 0), (uri("good.rec", 1), "second\nrecord", 1),
                           (uri("good.rec", 3), "third", 3), (uri("notes.dat", 0), "claimed by its content", 0)])
    assert [d["format"] for d in docs if d["source"] == uri("plain.txt")] == ["text"]
    quarantine = {(r["source"], r["reason"]) for r in pq.read_table(out / QUARANTINE_FILE).to_pylist()}
    assert quarantine == {(uri("good.rec", 2), "no_text"), (uri("headless.rec"), "corrupt"),
                          (uri("latin1.rec"), "parse_error")}
    assert result.counts.kept == len(docs) == 5
    assert result.counts.dropped == {"no_text": 1, "corrupt": 1, "parse_error": 1}
    assert result.counts.in_ == result.counts.kept + result.counts.dropped_total == 8
    index = {r["rel"]: r for r in pq.read_table(out / INDEX_FILE).to_pylist()}
    assert all(r["records"] == r["docs"] + r["quarantined"] for r in index.values())
    assert sum(r["records"] for r in index.values()) == result.counts.in_
    assert {rel: r["kind"] for rel, r in index.items()} == {
        "good.rec": "rec", "headless.rec": "rec", "latin1.rec": "rec", "notes.dat": "rec", "plain.txt": "text"}
    assert {rel: r["status"] for rel, r in index.items() if rel.endswith(".rec")} == {
        "good.rec": "partial", "headless.rec": "quarantined", "latin1.rec": "quarantined"}
    # Outside the block the format is gone again.
    assert REC not in FORMATS
    assert detect("x.rec") == "unknown"


def test_a_format_cannot_take_a_name_another_one_claims() -> None:
    with pytest.raises(ValueError, match="'.txt'"):
        register_format(Format("rec-as-txt", read_rec, extensions={".rec", ".txt"}))
    with pytest.raises(ValueError, match="taken"):
        register_format(Format("text", read_rec, extensions={".rec"}))
    with pytest.raises(ValueError, match="suffix"):
        Format("rec", read_rec, extensions={"rec"})
    assert detect("x.rec") == "unknown" and detect("x.txt") == "text"


def test_every_registered_extension_detects_its_format() -> None:
    for fmt in FORMATS:
        for ext in fmt.extensions:
            assert detect(f"folder/file{ext.upper()}") == fmt.name
        for name in fmt.filenames:
            assert detect(f"folder/{name}") == fmt.name
