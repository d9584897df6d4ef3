"""An archive bomb is one quarantine row for the archive, and none of its members' documents.

A nested bomb used to leave a row (or a document) per member read before the limit;
now the limit names itself and the member where it tripped, and the archive is all or nothing.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from archive_builders import tar_bytes, zip_bytes

from refinery.storage.documents import document_files, read_table
from refinery.tasks.ingest import INDEX_FILE, QUARANTINE_FILE, IngestConfig, run_ingest
from refinery.tasks.ingest.formats import archives
from refinery.tasks.ingest.sources import local_uri

LIMIT = 2**20  # max_decompressed_bytes of these tests: 1 MiB
MEMBER = b"the same words again and again " * 1100  # ~33 KiB of text, compresses ~100:1


def nested_zip_bomb(n: int = 16) -> bytes:
    """n zips of n text members each, in one zip: ~8 MiB of text, a few KiB on disk."""
    inner = zip_bytes({f"m{j:02d}.txt": MEMBER for j in range(n)})
    return zip_bytes({f"inner{i:02d}.zip": inner for i in range(n)})


def ingest(tmp_path: Path, files: dict[str, bytes]) -> tuple[list[dict], list[dict], list[dict]]:
    """Documents, quarantine rows and index rows of one ingest over `files`."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, data in files.items():
        (raw / name).write_bytes(data)
    stage = tmp_path / "ingest"
    cfg = IngestConfig(max_decompressed_bytes=LIMIT, workers=1)
    result = run_ingest([str(raw)], stage, cfg, progress=False)
    result.counts.check("ingest")  # kept + dropped add up to what was read
    docs = read_table(document_files(stage)).to_pylist() if document_files(stage) else []
    return docs, pq.read_table(stage / QUARANTINE_FILE).to_pylist(), pq.read_table(stage / INDEX_FILE).to_pylist()


def only_row(rows: list[dict], tmp_path: Path, name: str) -> dict:
    source = local_uri(str(tmp_path / "raw" / name))
    mine = [r for r in rows if r["source"].split("#")[0] == source]
    assert len(mine) == 1, mine
    return mine[0]


def test_nested_zip_bomb_is_one_row_and_no_documents(tmp_path: Path) -> None:
    bomb = nested_zip_bomb()
    assert len(bomb) < 64 * 1024  # small on disk
    docs, rows, index = ingest(tmp_path, {"bomb.zip": bomb, "fine.txt": b"An ordinary file beside the bomb."})
    row = only_row(rows, tmp_path, "bomb.zip")
    assert row["reason"] == "decompression_limit"
    assert f"max_decompressed_bytes={LIMIT}" in row["error"]
    assert "tripped at member 'inner" in row["error"] and ".zip/m" in row["error"]  # outer/inner path
    assert len(rows) == 1
    assert [d["source"] for d in docs] == [local_uri(str(tmp_path / "raw" / "fine.txt"))]
    status = {r["source"].rsplit("/", 1)[1]: (r["status"], r["docs"], r["quarantined"]) for r in index}
    assert status["bomb.zip"] == ("quarantined", 0, 1)


def test_tar_bomb_holding_zips_is_one_row(tmp_path: Path) -> None:
    inner = zip_bytes({f"m{j:02d}.txt": MEMBER for j in range(16)})
    bomb = gzip.compress(tar_bytes({f"part{i:02d}.zip": inner for i in range(16)}))
    docs, rows, index = ingest(tmp_path, {"bomb.tgz": bomb})
    row = only_row(rows, tmp_path, "bomb.tgz")
    assert row["reason"] == "decompression_limit"
    assert "tripped at member 'part" in row["error"]
    assert docs == [] and len(rows) == 1


def test_too_many_members_is_one_row_naming_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archives, "MAX_MEMBERS", 5)
    many = {f"f{i}.txt": f"member number {i}".encode() for i in range(8)}
    docs, rows, _ = ingest(tmp_path, {"many.zip": zip_bytes(many), "many.tar": tar_bytes(many)})
    assert docs == [] and len(rows) == 2
    for name in ("many.zip", "many.tar"):
        row = only_row(rows, tmp_path, name)
        assert row["reason"] == "decompression_limit"
        assert "MAX_MEMBERS=5" in row["error"] and "tripped at member 'f5.txt'" in row["error"]


def test_gzip_past_the_cap_is_a_decompression_limit(tmp_path: Path) -> None:
    docs, rows, _ = ingest(tmp_path, {"bomb.jsonl.gz": gzip.compress(b'{"text": "x"}\n' * (LIMIT // 7))})
    row = only_row(rows, tmp_path, "bomb.jsonl.gz")
    assert row["reason"] == "decompression_limit" and f"max_decompressed_bytes={LIMIT}" in row["error"]
    assert docs == []


def test_archive_under_the_limits_still_reads_every_member(tmp_path: Path) -> None:
    small = zip_bytes({"a.txt": b"First member text.", "b.zip": zip_bytes({"c.txt": b"Nested member text."})})
    docs, rows, _ = ingest(tmp_path, {"small.zip": small})
    assert rows == []
    assert sorted(d["text"] for d in docs) == ["First member text.", "Nested member text."]
