"""JSON arrays streamed element by element, and WARC files split into work units by record offsets."""

from __future__ import annotations

import gzip
import io
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from archive_builders import tar_bytes, zip_bytes

from refinery.storage.documents import document_files, read_table
from refinery.tasks.ingest import INDEX_FILE, QUARANTINE_FILE, IngestConfig, run_ingest
from refinery.tasks.ingest.base import Context, Problem, ReadError, Rows
from refinery.tasks.ingest.formats import jsonl
from refinery.tasks.ingest.sources import list_sources, local_uri
from refinery.tasks.ingest.units import WARC_GZ_RATIO, file_units, warc_unit_bytes

CFG = IngestConfig(workers=1)


def ingest(raw: Path, out: Path, cfg: IngestConfig = CFG) -> tuple[dict[str, dict], dict[str, dict]]:
    result = run_ingest([str(raw)], out, cfg, progress=False)
    result.counts.check("ingest")
    docs = {d["source"]: d for d in read_table(document_files(out)).to_pylist()}
    rows = {r["source"]: r for r in pq.read_table(out / QUARANTINE_FILE).to_pylist()}
    return docs, rows


def stream(data: bytes, **settings: object) -> list:
    """Records of a `.json` file's bytes through the streaming reader, Rows blocks opened into Docs."""
    ctx = Context(IngestConfig(**settings), time.monotonic() + 60)  # type: ignore[arg-type]
    out: list = []
    for item in jsonl.stream_json(io.BytesIO(data), ctx):
        out.extend(item.docs() if isinstance(item, Rows) else [item])
    return out


def records(n: int) -> list[dict]:
    """Records whose text holds what a window cut could mistake: quotes, escapes, brackets, commas, non-ASCII."""
    tricky = ['say "hi", then {leave}', "a\\b\\\\c\\", "[1, 2]", "naïve café ☕ 東京", "tab\there\nnewline", "\\\"q\\\""]
    out = []
    for i in range(n):
        text = f"record {i} " + tricky[i % len(tricky)] * (1 + i % 7)
        out.append({"text": text, "id": f"r{i}", "score": i / 7, "ok": i % 2 == 0, "tags": ["a", {"b": "]"}]})
    return out


# -- JSON arrays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("read_bytes", [5, 64, 1 << 20])
def test_streamed_json_array_gives_the_same_records_as_the_whole_parse(
    read_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read windows as small as 5 bytes cut every string, escape and multi-byte character somewhere."""
    monkeypatch.setattr(jsonl, "_READ_BYTES", read_bytes)
    recs = records(60)
    recs.append({"text": "big " + "x\\\"y" * 100_000})  # bigger than a window: the window grows
    data = json.dumps(recs, ensure_ascii=False, indent=1).encode()
    whole = json.loads(data)
    items = stream(data)
    assert [d.pos for d in items] == list(range(len(whole)))
    assert [d.text for d in items] == [r["text"] for r in whole]
    assert [d.meta for d in items] == [{k: v for k, v in r.items() if k not in ("text", "tags")} for r in whole]
    compact = json.dumps(recs, ensure_ascii=False, separators=(",", ":")).encode()
    assert [d.text for d in stream(compact)] == [r["text"] for r in whole]
    assert [d.nbytes for d in stream(compact)] == [len(json.dumps(r, ensure_ascii=False, separators=(",", ":"))
                                                       .encode()) for r in whole]


def test_json_array_in_the_stage_matches_the_whole_parse(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    recs = records(3000)
    (raw / "a.json").write_text(json.dumps(recs, ensure_ascii=False))
    (raw / "b.json.gz").write_bytes(gzip.compress(json.dumps(recs).encode()))
    docs, rows = ingest(raw, tmp_path / "out")
    assert rows == {}
    for name in ("a.json", "b.json.gz"):
        uri = local_uri(str(raw / name))
        got = [docs[f"{uri}#{i}"] for i in range(len(recs))]
        assert [d["text"] for d in got] == [r["text"] for r in recs]
        assert [json.loads(d["meta"])["id"] for d in got] == [r["id"] for r in recs]
        assert {d["format"] for d in got} == {"jsonl"}
    assert len(docs) == 2 * len(recs)


def test_bad_elements_are_quarantined_by_number_and_the_rest_kept(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    parts = [json.dumps({"text": f"element {i}", "url": f"u{i}"}) for i in range(10)]
    parts[3] = '{"text": "bad", "x": tru}'  # not JSON
    parts[4] = '{"text": "bad", "x": [1, 2}'  # brackets that don't match
    parts[5] = '"a string, not a record"'
    parts[6] = json.dumps({"text": "y" * 5000})  # over max_record_bytes
    parts[7] = json.dumps({"body": "no text field"})
    data = ("[\n" + ",\n".join(parts) + "\n]\n").encode()
    (raw / "plain.json").write_bytes(data)
    (raw / "packed.json.gz").write_bytes(gzip.compress(data))
    docs, rows = ingest(raw, tmp_path / "out", IngestConfig(workers=1, max_record_bytes=1000))
    for name in ("plain.json", "packed.json.gz"):
        uri = local_uri(str(raw / name))
        assert sorted(int(s.rsplit("#", 1)[1]) for s in docs if s.startswith(uri + "#")) == [0, 1, 2, 8, 9]
        assert docs[f"{uri}#8"]["text"] == "element 8" and json.loads(docs[f"{uri}#8"]["meta"]) == {"url": "u8"}
        assert {s: r["reason"] for s, r in rows.items() if s.startswith(uri)} == {
            f"{uri}#3": "invalid_json", f"{uri}#4": "invalid_json", f"{uri}#5": "missing_text_field",
            f"{uri}#6": "too_large", f"{uri}#7": "missing_text_field"}
        assert "element 6" in rows[f"{uri}#6"]["error"] and "max_record_bytes=1000" in rows[f"{uri}#6"]["error"]
    index = {r["rel"]: r for r in pq.read_table(tmp_path / "out" / INDEX_FILE).to_pylist()}
    assert index["plain.json"]["status"] == "partial" and index["plain.json"]["records"] == 10


def test_oversize_element_is_skipped_without_holding_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "_READ_BYTES", 256)
    big = {"text": 'q"\\' * 20_000, "nested": [[{"a": "]}"}]] * 50}
    data = json.dumps([{"text": "first"}, big, {"text": "last"}]).encode()
    items = sorted(stream(data, max_record_bytes=4096), key=lambda i: i.pos)  # problems come before blocks
    assert [(type(i).__name__, i.pos) for i in items] == [("Doc", 0), ("Problem", 1), ("Doc", 2)]
    assert items[1].reason == "too_large" and items[2].text == "last"


def test_json_array_broken_part_way_keeps_what_was_read(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    recs = [{"text": f"element number {i} " + "padding " * 40} for i in range(30_000)]  # 10 MB: reads are 1 MB
    data = json.dumps(recs).encode()
    (raw / "cut.json").write_bytes(data[: len(data) // 2])  # ends inside an element
    packed = gzip.compress(data)
    (raw / "cut.json.gz").write_bytes(packed[: len(packed) // 2])  # the gzip stream ends early
    (raw / "junk.json").write_bytes(data[:-1] + b" {oops}")  # an element where `,` or `]` belongs
    docs, rows = ingest(raw, tmp_path / "out")
    index = {r["rel"]: r for r in pq.read_table(tmp_path / "out" / INDEX_FILE).to_pylist()}
    for name, reason in (("cut.json", "truncated"), ("cut.json.gz", "truncated"), ("junk.json", "invalid_json")):
        uri = local_uri(str(raw / name))
        kept = sorted(int(s.rsplit("#", 1)[1]) for s in docs if s.startswith(uri + "#"))
        assert 0 < len(kept) and kept == list(range(len(kept)))  # every element before the break
        assert [r["reason"] for s, r in rows.items() if s.split("#")[0] == uri] == [reason], name
        assert index[name]["status"] == "partial" and index[name]["docs"] == len(kept)
    assert len([s for s in docs if s.startswith(local_uri(str(raw / "junk.json")) + "#")]) == len(recs)
    # The gzip cut loses only what the reader had not decoded yet: at most one block of records.
    assert len([s for s in docs if s.startswith(local_uri(str(raw / "cut.json.gz")) + "#")]) > len(recs) // 4


def test_one_object_and_json_lines_saved_as_json() -> None:
    one = stream(b'  {"text": "just one", "lang": "en"}\n')
    assert [(d.pos, d.text, d.meta) for d in one] == [(0, "just one", {"lang": "en"})]
    lines = sorted(stream(b'{"text": "first line"}\n{not json\n{"text": "third line"}\n'), key=lambda i: i.pos)
    assert [(type(i).__name__, i.pos) for i in lines] == [("Doc", 0), ("Problem", 1), ("Doc", 2)]
    assert lines[2].meta == {"line": 3}
    with pytest.raises(ReadError) as exc:
        stream(b'{"text": "a"} trailing')
    assert exc.value.reason == "invalid_json"
    with pytest.raises(ReadError):
        stream(b" \n ")
    assert stream(b"[]") == []
    assert [i.reason for i in stream(b'[{"text": "a"}, 7]') if isinstance(i, Problem)] == ["missing_text_field"]
    assert [d.text for d in stream('\ufeff[{"text": "bom"}]'.encode())] == ["bom"]  # a UTF-8 byte order mark


# -- WARC work units ----------------------------------------------------------------------------------


def warc_records(n: int) -> list[bytes]:
    """`n` uncompressed WARC records: responses (HTML, some not 2xx, some images), requests and metadata."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = []
    for i in range(n):
        buf = io.BytesIO()
        writer = WARCWriter(buf, gzip=False)
        url = f"http://example.com/page{i}"
        if i % 5 == 1:
            http = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.com")], is_http_request=True)
            record = writer.create_warc_record(url, "request", http_headers=http)
        elif i % 11 == 3:
            record = writer.create_warc_record(url, "metadata", payload=io.BytesIO(b"via: test\r\n"),
                                               warc_content_type="application/warc-fields")
        else:
            status, ctype = ("404 Not Found", "text/html") if i % 13 == 4 else ("200 OK", "text/html")
            body = (f"<html><head><title>Page {i}</title></head><body><main><h1>Heading {i}</h1>"
                    + "".join(f"<p>Paragraph {j} of page {i}, with words enough to be main text.</p>"
                              for j in range(20 + i % 9)) + "</main></body></html>").encode()
            if i % 17 == 6:
                ctype, body = "image/png", b"\x89PNG\r\n\x1a\n" + bytes(200)
            http = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http,
                                               warc_headers_dict={"WARC-Date": "2024-01-02T03:04:05Z"})
        writer.write_record(record)
        out.append(buf.getvalue())
    return out


def warc_file(path: Path, recs: list[bytes]) -> bytes:
    """A .warc.gz with one gzip member per record (as crawlers write them), or a plain .warc."""
    data = b"".join(gzip.compress(r, mtime=0) for r in recs) if path.name.endswith(".gz") else b"".join(recs)
    path.write_bytes(data)
    return data


def split_vs_whole(tmp_path: Path, raw: Path, batch_bytes: int, min_units: int, workers: int = 1) -> dict:
    """Ingest `raw` whole and split into units of `batch_bytes`: the outputs must be the same, byte for byte."""
    split_cfg = IngestConfig(workers=workers, batch_bytes=batch_bytes)
    for sf in list_sources([str(raw)], split_cfg):
        units = list(file_units(sf, split_cfg))
        assert len(units) >= min_units, (sf.rel, len(units))
        assert [u.start for u in units[1:]] == [u.stop for u in units[:-1]]  # the ranges tile the file
    whole = run_ingest([str(raw)], tmp_path / "whole", CFG, progress=False)
    split = run_ingest([str(raw)], tmp_path / "split", split_cfg, progress=False)
    a = read_table(document_files(tmp_path / "whole"))
    b = read_table(document_files(tmp_path / "split"))
    assert a.num_rows > 0 and a.equals(b)  # same ids, sources (#n), text, meta and order
    qa, qb = (pq.read_table(tmp_path / d / QUARANTINE_FILE) for d in ("whole", "split"))
    assert qa.equals(qb)
    assert pq.read_table(tmp_path / "whole" / INDEX_FILE).equals(pq.read_table(tmp_path / "split" / INDEX_FILE))
    assert whole.counts == split.counts
    return {"docs": a.to_pylist(), "quarantine": qa.to_pylist()}


@pytest.mark.parametrize(("name", "workers"), [("crawl.warc.gz", 1), ("crawl.warc", 1), ("crawl.warc.gz", 2)])
def test_split_warc_gives_the_same_documents_as_a_whole_read(tmp_path: Path, name: str, workers: int) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    data = warc_file(raw / name, warc_records(120))
    out = split_vs_whole(tmp_path, raw, len(data) // 5, min_units=3, workers=workers)
    uri = local_uri(str(raw / name))
    numbers = [int(d["source"].rsplit("#", 1)[1]) for d in out["docs"]]
    assert numbers == sorted(numbers) and all(i % 5 != 1 and i % 11 != 3 for i in numbers)
    assert {r["source"]: r["reason"] for r in out["quarantine"]} == {
        f"{uri}#{i}": "unsupported_format" for i in range(120)
        if i % 17 == 6 and i % 5 != 1 and i % 11 != 3 and i % 13 != 4}  # images, not requests, metadata or 404s


def test_truncated_warc_in_a_unit_quarantines_the_same_record(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    recs = warc_records(90)
    members = [gzip.compress(r, mtime=0) for r in recs]
    members[40] = members[40][:60] + b"\xff" * 24 + members[40][84:]  # damaged deflate data mid-file
    cut = b"".join(members[:83]) + members[83][: len(members[83]) // 2]  # the file ends inside response 83
    (raw / "cut.warc.gz").write_bytes(cut)
    recs_plain = list(recs[:70])
    recs_plain[30] = recs_plain[30].replace(b"WARC/1.", b"WARX/1.", 1)  # a header that doesn't parse
    (raw / "cut.warc").write_bytes(b"".join(recs_plain) + recs[70][: len(recs[70]) // 2])
    out = split_vs_whole(tmp_path, raw, len(cut) // 6, min_units=3)
    gz, plain = local_uri(str(raw / "cut.warc.gz")), local_uri(str(raw / "cut.warc"))
    reasons = {r["source"]: r["reason"] for r in out["quarantine"]}
    assert reasons[f"{gz}#40"] == reasons[f"{plain}#30"] == "corrupt_record"
    assert f"{gz}#83" in reasons  # the cut record: its header reads, its payload is gone
    docs = {d["source"] for d in out["docs"]}
    assert {f"{gz}#39", f"{gz}#42", f"{gz}#79", f"{plain}#29", f"{plain}#32", f"{plain}#68"} <= docs


def test_small_and_single_stream_warc_files_stay_one_unit(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    recs = warc_records(60)
    (raw / "one-stream.warc.gz").write_bytes(gzip.compress(b"".join(recs)))  # not one member per record
    warc_file(raw / "per-record.warc.gz", recs)
    small = warc_file(raw / "small.warc.gz", recs[:5])
    # A .warc.gz unit is a quarter of batch_bytes (gzip shrinks HTML about 4x): a file must be bigger to be split.
    cfg = IngestConfig(workers=1, batch_bytes=len(small) * WARC_GZ_RATIO)
    assert warc_unit_bytes("small.warc.gz", cfg) == len(small) and warc_unit_bytes("x.warc", cfg) == cfg.batch_bytes
    units = {sf.rel: list(file_units(sf, cfg)) for sf in list_sources([str(raw)], cfg)}
    assert len(units["per-record.warc.gz"]) >= 3  # the same records, one gzip member each: split
    assert len(units["one-stream.warc.gz"]) == 1 and len(units["small.warc.gz"]) == 1
    assert (raw / "one-stream.warc.gz").stat().st_size > warc_unit_bytes("one-stream.warc.gz", cfg)
    docs, _ = ingest(raw, tmp_path / "out", cfg)
    by_file = {name: sorted(s.rsplit("#", 1)[1] for s in docs if s.startswith(local_uri(str(raw / name)) + "#"))
               for name in ("one-stream.warc.gz", "per-record.warc.gz")}
    assert by_file["one-stream.warc.gz"] == by_file["per-record.warc.gz"] and len(by_file["per-record.warc.gz"]) > 30


# -- archives streamed member by member ---------------------------------------------------------------


def archive_members() -> dict[str, bytes]:
    lines = [json.dumps({"text": f"line record {i}", "n": i}) for i in range(3000)]
    lines[10] = "{broken"
    return {
        "notes.txt": b"A plain text member of the archive.",
        "data/records.jsonl": "\n".join(lines).encode(),
        "data/array.json.gz": gzip.compress(json.dumps([{"text": f"element {i}"} for i in range(500)]).encode()),
        "../evil.txt": b"must not be read",
        "crawl.warc.gz": b"".join(gzip.compress(r, mtime=0) for r in warc_records(12)),
        "empty.jsonl": b"",
    }


@pytest.mark.parametrize("name", ["bundle.tar.gz", "bundle.zip"])
def test_streamed_archive_gives_what_the_in_memory_read_gives(tmp_path: Path, name: str) -> None:
    from refinery.tasks.ingest.formats import read_blob
    from refinery.tasks.ingest.formats.archives import stream_archive

    data = tar_bytes(archive_members(), "gz") if name.endswith(".tar.gz") else zip_bytes(archive_members())
    ctx = Context(CFG, time.monotonic() + 60)
    in_memory = list(read_blob(name, data, ctx))
    streamed = list(stream_archive(name, io.BytesIO(data), Context(CFG, time.monotonic() + 60)))

    def view(items: list) -> list[tuple]:
        return [(type(i).__name__, i.pos, getattr(i, "text", None), getattr(i, "reason", None),
                 json.dumps(getattr(i, "meta", None), sort_keys=True, default=str)) for i in items]

    assert view(streamed) == view(in_memory)
    assert [i.pos for i in streamed] == list(range(len(streamed)))  # numbered across members
    docs = [i for i in streamed if not isinstance(i, Problem)]
    assert {d.meta["member"] for d in docs} == {"notes.txt", "data/records.jsonl", "data/array.json.gz",
                                                "crawl.warc.gz"}
    reasons = sorted(i.reason for i in streamed if isinstance(i, Problem))
    assert reasons == ["empty", "invalid_json", "unsafe_path"]
    assert len([d for d in docs if d.meta["member"] == "data/records.jsonl"]) == 2999


def test_streamed_dataset_member_is_not_held_to_the_file_size_cap(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = "\n".join(json.dumps({"text": f"record {i} " + "words " * 20}) for i in range(2000)).encode()
    (raw / "big.tar.gz").write_bytes(tar_bytes({"big.jsonl": lines, "big.txt": b"text " * 5000}, "gz"))
    docs, rows = ingest(raw, tmp_path / "out", IngestConfig(workers=1, max_file_bytes=20_000))
    uri = local_uri(str(raw / "big.tar.gz"))
    assert len(docs) == 2000 and all(json.loads(d["meta"])["member"] == "big.jsonl" for d in docs.values())
    assert [(s, r["reason"]) for s, r in rows.items()] == [(f"{uri}#2000", "too_large")]  # the text member
