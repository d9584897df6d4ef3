"""Parquet, Arrow IPC and CSV members of zip and tar archives, read as their standalone files are.

Such a member is spooled to a temporary file and read record by record through the standalone
reader: the same documents and quarantine rows as the file ingested on its own, no `max_file_bytes`
cap, the archive's `max_decompressed_bytes` still charged, and the temporary file gone afterwards.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from archive_builders import tar_bytes, zip_bytes

from refinery.storage.documents import document_files, read_table
from refinery.tasks.ingest import QUARANTINE_FILE, IngestConfig, run_ingest
from refinery.tasks.ingest.base import Context, Doc, Problem
from refinery.tasks.ingest.formats.archives import stream_archive
from refinery.tasks.ingest.formats.parquet import BATCH_ROWS
from refinery.tasks.ingest.sources import local_uri

RECORD_LIMIT = 2000  # max_record_bytes of these tests, so an oversize row is cheap to make


# -- building members and archives -------------------------------------------------------------


def parquet_bytes(table: pa.Table, row_group_size: int, **options: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, **options)
    return buf.getvalue()


def rows_table(n: int) -> pa.Table:
    """Text with non-ASCII and a few bad rows (null, blank, oversize), and meta columns of several types."""
    texts: list[str | None] = [f"row {i} naïve café ☕ \"quoted\"" for i in range(n)]
    texts[7], texts[20], texts[33] = None, "   ", "x" * (RECORD_LIMIT + 1)
    return pa.table({
        "text": texts,
        "id": [f"r{i}" for i in range(n)],
        "score": [i / 7 for i in range(n)],
        "ok": [i % 2 == 0 for i in range(n)],
        "day": pa.array([i % 28 for i in range(n)], pa.int32()).cast(pa.date32()),
        "tags": [["a", "b"]] * n,  # not a scalar: never in meta
    })


def arrow_file_bytes(table: pa.Table, batch_rows: int, stream: bool = False) -> bytes:
    buf = io.BytesIO()
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(buf, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return buf.getvalue()


CSV = (
    'text,url,lang\n'
    'first row,https://a.example/1,en\n'
    '"a value, with a comma and\na newline",https://a.example/2,en\n'
    'too,many,fields,here\n'
    ',https://a.example/4,fr\n'
    'dernière ligne,https://a.example/5,fr\n'
)


def dataset_members() -> dict[str, bytes]:
    """Dataset files as they would sit in a folder, under the same names inside an archive."""
    table = rows_table(100)
    return {
        "data/rows.parquet": parquet_bytes(table, 30),  # four row groups
        "data/wrong_schema.parquet": parquet_bytes(pa.table({"text": [1, 2, 3], "id": ["a", "b", "c"]}), 2),
        "data/table.arrow": arrow_file_bytes(table, 40),  # IPC file form: the reader seeks to the footer
        "data/stream.ipc": arrow_file_bytes(table.slice(0, 50), 16, stream=True),  # IPC stream form
        "tables/plain.tsv": CSV.replace(",", "\t").encode(),
        "tables/packed.csv.gz": gzip.compress(CSV.encode(), mtime=0),  # decompressed as it is read, as on its own
        "tables/packed.tsv.gz": gzip.compress(CSV.replace(",", "\t").encode(), mtime=0),  # tabs, not commas
        "notes.txt": b"A plain text member beside the datasets.",
    }


def pack(name: str, members: dict[str, bytes]) -> bytes:
    return zip_bytes(members) if name.endswith(".zip") else tar_bytes(members, "gz")


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def ingest(sources: list[Path], out: Path, cfg: IngestConfig) -> tuple[list[dict], list[dict]]:
    result = run_ingest([str(s) for s in sources], out, cfg, progress=False)
    result.counts.check("ingest")
    docs = read_table(document_files(out)).to_pylist() if document_files(out) else []
    return docs, pq.read_table(out / QUARANTINE_FILE).to_pylist()


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp dir members are spooled to, private to the test so its emptiness means something."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# -- the same records as the standalone files ---------------------------------------------------


@pytest.mark.parametrize("archive", ["bundle.zip", "bundle.tar.gz"])
def test_members_give_what_the_standalone_files_give(tmp_path: Path, archive: str, spool_dir: Path) -> None:
    members = dataset_members()
    direct, packed = tmp_path / "direct", tmp_path / "packed"
    write(direct, members)
    write(packed, {archive: pack(archive, members)})
    cfg = IngestConfig(workers=1, max_record_bytes=RECORD_LIMIT)
    docs, rows = ingest([direct, packed], tmp_path / "out", cfg)

    prefix = local_uri(str(direct)) + "/"
    archive_uri = local_uri(str(packed / archive))
    alone: dict[tuple[str, int | None], tuple] = {}
    inside: dict[tuple[str, int | None], tuple] = {}
    for d in docs:
        meta = json.loads(d["meta"])
        if d["source"].startswith(prefix):
            rel, _, n = d["source"][len(prefix):].partition("#")
            alone[(rel, int(n) if n else None)] = (d["text"], d["format"], d["bytes"], meta)
        else:
            assert d["source"].startswith(archive_uri + "#")
            key = (meta.pop("member"), meta.pop("member_record", None))
            inside[key] = (d["text"], d["format"], d["bytes"], meta)
    assert inside == alone
    counts = {m: sum(1 for k in alone if k[0] == m) for m in members}
    assert counts == {"data/rows.parquet": 97, "data/wrong_schema.parquet": 0, "data/table.arrow": 97,
                      "data/stream.ipc": 47, "tables/plain.tsv": 3, "tables/packed.csv.gz": 3, "tables/packed.tsv.gz": 3,
                      "notes.txt": 1}
    assert {v[1] for k, v in alone.items() if k[0].endswith((".arrow", ".ipc"))} == {"parquet"}

    def problems(mine: list[dict]) -> list[tuple[str, str]]:
        return sorted((r["reason"], r["error"]) for r in mine)

    standalone = [r for r in rows if r["source"].startswith(prefix)]
    from_archive = [r for r in rows if r["source"].startswith(archive_uri)]
    expected = []
    for r in standalone:
        rel = r["source"][len(prefix):].partition("#")[0]
        expected.append({"reason": r["reason"], "error": f"member {rel!r}: {r['error']}"})
    assert problems(from_archive) == problems(expected)
    reasons = sorted(r["reason"] for r in standalone)
    assert reasons == sorted(["missing_text_field", "no_text", "too_large"] * 3 + ["missing_text_field"] * 3
                             + ["invalid_row", "no_text"] * 3)
    assert all("#" in r["source"] for r in from_archive)  # numbered across the archive, as every member is
    assert list(spool_dir.iterdir()) == []


@pytest.mark.parametrize("archive", ["bundle.zip", "bundle.tar.gz"])
def test_a_corrupt_row_group_keeps_the_rows_before_it(tmp_path: Path, archive: str, spool_dir: Path) -> None:
    n = 3 * BATCH_ROWS
    table = pa.table({"text": [f"row {i} of the table" for i in range(n)], "n": list(range(n))})
    data = bytearray(parquet_bytes(table, BATCH_ROWS, compression="none"))
    column = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data[start:start + 8] = b"\xff" * 8  # the second row group's first page header
    direct, packed = tmp_path / "direct", tmp_path / "packed"
    write(direct, {"broken.parquet": bytes(data)})
    write(packed, {archive: pack(archive, {"broken.parquet": bytes(data), "after.txt": b"The member after it."})})
    docs, rows = ingest([direct, packed], tmp_path / "out", IngestConfig(workers=1))

    archive_uri = local_uri(str(packed / archive))
    alone = sorted(d["text"] for d in docs if not d["source"].startswith(archive_uri))
    inside = sorted(d["text"] for d in docs if d["source"].startswith(archive_uri)
                    and json.loads(d["meta"])["member"] == "broken.parquet")
    assert len(alone) == BATCH_ROWS and inside == alone  # the first row group, then the break
    assert any(d["text"] == "The member after it." for d in docs)  # the archive goes on
    by_file = {r["source"].split("#")[0]: r for r in rows}
    assert len(rows) == 2 and by_file[archive_uri]["reason"] == by_file[local_uri(str(direct / "broken.parquet"))][
        "reason"] == "corrupt"
    assert by_file[archive_uri]["error"].startswith("member 'broken.parquet': Parquet file broken at row 2048")
    assert list(spool_dir.iterdir()) == []


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", ["bundle.zip", "bundle.tar.gz"])
def test_a_member_over_max_file_bytes_is_still_read_whole(tmp_path: Path, archive: str, spool_dir: Path) -> None:
    n = 5000
    table = pa.table({"text": [f"record {i}: " + "some words " * 8 for i in range(n)], "i": list(range(n))})
    member = parquet_bytes(table, 1000, compression="none")
    cap = 20_000
    assert len(member) > 5 * cap
    write(tmp_path / "raw", {archive: pack(archive, {"big.parquet": member, "big.txt": b"words " * 5000})})
    docs, rows = ingest([tmp_path / "raw"], tmp_path / "out", IngestConfig(workers=1, max_file_bytes=cap))
    metas = [json.loads(d["meta"]) for d in docs]
    assert sorted(m["i"] for m in metas) == list(range(n))
    assert all(m["member"] == "big.parquet" for m in metas)
    assert [r["reason"] for r in rows] == ["too_large"] and rows[0]["error"].startswith("member 'big.txt'")


@pytest.mark.parametrize("archive", ["bundle.zip", "bundle.tar.gz"])
def test_a_spooled_bomb_is_one_row_and_never_outgrows_the_budget(
    tmp_path: Path, archive: str, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 5 * 2**19  # 2.5 MiB: the copy is charged a 1 MiB chunk at a time
    sizes: list[int] = []
    unlink = os.unlink

    def watched(path: Any, *args: Any, **kwargs: Any) -> None:  # the size of each copy as it is removed
        if str(path).startswith(str(spool_dir)):
            sizes.append(os.path.getsize(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", watched)
    fine = b"text\nA row before the bomb.\n"
    bomb = b"text\n" + b"the same line again\n" * (8 * 2**20 // 20)  # 8 MiB of CSV, deflates ~500:1
    write(tmp_path / "raw", {archive: pack(archive, {"fine.csv": fine, "bomb.csv": bomb})})
    docs, rows = ingest([tmp_path / "raw"], tmp_path / "out", IngestConfig(workers=1, max_decompressed_bytes=limit))
    assert docs == []  # the whole archive is one row, none of its members' documents
    assert len(rows) == 1 and rows[0]["reason"] == "decompression_limit"
    assert "tripped at member 'bomb.csv'" in rows[0]["error"]
    assert sizes[0] == len(fine) and len(sizes) == 2  # both copies removed
    assert 0 < sizes[1] <= limit - len(fine)  # the bomb's copy stopped within the budget, before the disk
    assert list(spool_dir.iterdir()) == []


# -- the temporary file ------------------------------------------------------------------------


@pytest.mark.parametrize("archive", ["bundle.zip", "bundle.tar.gz"])
def test_the_spool_file_lives_only_while_its_member_is_read(archive: str, spool_dir: Path) -> None:
    table = pa.table({"text": [f"row {i}" for i in range(3 * BATCH_ROWS)]})
    data = pack(archive, {"a.parquet": parquet_bytes(table, BATCH_ROWS), "b.csv": b"text\none\ntwo\n"})
    ctx = Context(IngestConfig(), time.monotonic() + 60)
    items = stream_archive(archive, io.BytesIO(data), ctx)
    first = next(items)
    assert isinstance(first, Doc) and first.text == "row 0"
    assert len(list(spool_dir.iterdir())) == 1  # a.parquet, copied while it is read
    items.close()  # the reader stops part-way: the copy goes with it
    assert list(spool_dir.iterdir()) == []

    ctx = Context(IngestConfig(), time.monotonic() + 60)
    seen = []
    for item in stream_archive(archive, io.BytesIO(data), ctx):
        seen.append(len(list(spool_dir.iterdir())))
        assert isinstance(item, Doc)
    assert len(seen) == 3 * BATCH_ROWS + 2 and set(seen) == {1}  # one copy at a time: a.parquet's, then b.csv's
    assert list(spool_dir.iterdir()) == []


def test_an_unreadable_member_leaves_no_spool_file(spool_dir: Path) -> None:
    data = zip_bytes({"bad.parquet": b"PAR1 this is not a Parquet file PAR1", "ok.arrow": b"nor an Arrow one"})
    items = list(stream_archive("x.zip", io.BytesIO(data), Context(IngestConfig(), time.monotonic() + 60)))
    assert [(type(i), i.reason) for i in items] == [(Problem, "corrupt"), (Problem, "corrupt")]
    assert items[0].error.startswith("member 'bad.parquet': unreadable Parquet")
    assert list(spool_dir.iterdir()) == []


# -- memory ------------------------------------------------------------------------------------

_PEAK = textwrap.dedent("""
    import io, sys, time
    from refinery.tasks.ingest import IngestConfig
    from refinery.tasks.ingest.base import Context
    from refinery.tasks.ingest.formats.archives import stream_archive

    n = 0
    with open(sys.argv[1], "rb") as f:
        for item in stream_archive(sys.argv[1], f, Context(IngestConfig(), time.monotonic() + 600)):
            n += 1
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(n, int(peak.split()[1]) * 1024)
""")


def _peak(path: Path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], check=True, capture_output=True, text=True)
    n, peak = out.stdout.split()
    return int(n), int(peak)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is read from /proc")
def test_memory_stays_bounded_by_a_row_group_not_the_member(tmp_path: Path) -> None:
    """A member four times bigger costs no more memory: it is on disk, read a row group at a time."""

    def member(mib: int) -> Path:
        rows = mib * 2**20 // 1000
        texts = pa.array([os.urandom(500).hex() for _ in range(2048)] * (rows // 2048))  # ~1 kB rows
        data = parquet_bytes(pa.table({"text": texts}), 4096, compression="none", use_dictionary=False)
        path = tmp_path / f"m{mib}.tar"
        with tarfile.open(path, "w") as t:
            info = tarfile.TarInfo("big.parquet")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        return path

    small_n, small_peak = _peak(member(24))
    big_n, big_peak = _peak(member(96))
    assert big_n > 3.5 * small_n
    assert big_peak - small_peak < 24 * 2**20, (small_peak, big_peak)
