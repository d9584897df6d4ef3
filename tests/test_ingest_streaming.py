"""Dataset files are streamed by record: memory bounded by a batch, limits and quarantine per record,
big files split into work units with ids that don't depend on the split."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from refinery.storage.documents import document_files, read_table
from refinery.tasks.ingest import INDEX_FILE, QUARANTINE_FILE, IngestConfig, run_ingest
from refinery.tasks.ingest.sources import local_uri

CFG = IngestConfig(workers=1)
WORDS = ("data model pipeline token corpus shard filter quality stream record batch unit column "
         "parquet arrow window memory bounded worker driver row group line offset").split()


def ingest(raw: Path, out: Path, cfg: IngestConfig = CFG) -> tuple[dict[str, dict], dict[str, dict]]:
    result = run_ingest([str(raw)], out, cfg, progress=False)
    result.counts.check("ingest")
    docs = {d["source"]: d for d in read_table(document_files(out)).to_pylist()}
    rows = {r["source"]: r for r in pq.read_table(out / QUARANTINE_FILE).to_pylist()}
    return docs, rows


def text_pool(n: int, words: int, seed: int = 0) -> pa.Array:
    """`n` different texts of about `words` words each (repeated text, varied: cheap to make at size)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(WORDS), size=(n, words))
    return pa.array([f"text {i}: " + " ".join(WORDS[j] for j in row) for i, row in enumerate(picks)], pa.large_string())


# -- memory does not grow with the file --------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import pyarrow.parquet as pq
    from refinery.storage.documents import document_files
    from refinery.tasks.ingest import IngestConfig, run_ingest
    src, out = sys.argv[1], Path(sys.argv[2])
    result = run_ingest([src], out, IngestConfig(workers=1), progress=False)
    docs = sum(pq.ParquetFile(p).metadata.num_rows for p in document_files(out))
    # VmHWM, not ru_maxrss alone: after fork + exec, ru_maxrss keeps the parent's peak (pytest holding
    # the generated table), which would hide this process's own.
    try:
        status = Path("/proc/self/status").read_text()
        rss = next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"docs": docs, "rss": rss, "dropped": result.counts.dropped}))
""")


def write_big_parquet(path: Path, text_mb: int) -> int:
    """A Parquet file holding about `text_mb` MB of text in several row groups; returns its rows."""
    pool = text_pool(2000, 400)  # ~3 KB each
    avg = pa.compute.sum(pa.compute.binary_length(pool)).as_py() / len(pool)
    rows = int(text_mb * 1e6 / avg)
    idx = np.arange(rows) % len(pool)
    table = pa.table({"text": pool.take(pa.array(idx)), "id": pa.array(np.arange(rows).astype(str)),
                      "url": pa.array([f"https://example.com/{i}" for i in range(rows)])})
    pq.write_table(table, path, row_group_size=max(1, rows // 6), compression="zstd")
    return rows


def run_child(src: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_parquet_memory_is_bounded_by_the_batch_not_the_file(tmp_path: Path) -> None:
    small_rows = write_big_parquet(tmp_path / "small.parquet", 75)
    large_rows = write_big_parquet(tmp_path / "large.parquet", 300)
    small = run_child(tmp_path / "small.parquet", tmp_path / "out-small")
    large = run_child(tmp_path / "large.parquet", tmp_path / "out-large")
    assert (small["docs"], large["docs"]) == (small_rows, large_rows)  # every record is a document
    assert small["dropped"] == large["dropped"] == {}
    assert large["rss"] - small["rss"] < 100e6, (small["rss"] / 1e6, large["rss"] / 1e6)


# -- per-record limits and quarantine -----------------------------------------------------------


def test_bad_records_are_quarantined_by_number_and_the_rest_kept(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": f"record {i}", "url": f"u{i}"}) for i in range(10)]
    lines[4] = "{not json"
    lines[6] = json.dumps({"text": "x" * 5000})  # over max_record_bytes
    lines[7] = json.dumps({"text": None})
    lines[8] = json.dumps({"text": "   "})
    (raw / "dump.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    docs, rows = ingest(raw, tmp_path / "out", IngestConfig(workers=1, max_record_bytes=1000))
    uri = local_uri(str(raw / "dump.jsonl.zst"))
    assert sorted(int(s.rsplit("#", 1)[1]) for s in docs) == [0, 1, 2, 3, 5, 9]
    assert {s: r["reason"] for s, r in rows.items()} == {
        f"{uri}#4": "invalid_json", f"{uri}#6": "too_large", f"{uri}#7": "missing_text_field", f"{uri}#8": "no_text"}
    assert "line 7" in rows[f"{uri}#6"]["error"] and "max_record_bytes=1000" in rows[f"{uri}#6"]["error"]
    assert json.loads(docs[f"{uri}#5"]["meta"]) == {"url": "u5", "line": 6}


def test_a_stream_broken_part_way_keeps_what_was_read(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": f"record number {i} " + "padding " * 50}) for i in range(20_000)]
    data = gzip.compress("\n".join(lines).encode())
    (raw / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, rows = ingest(raw, tmp_path / "out")
    assert 0 < len(docs) < len(lines)
    assert [r["reason"] for r in rows.values()] == ["truncated"]
    index = pq.read_table(tmp_path / "out" / INDEX_FILE).to_pylist()
    assert index[0]["status"] == "partial" and index[0]["docs"] == len(docs)


def test_dataset_files_are_exempt_from_the_file_size_cap(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "d.jsonl").write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(500)))
    (raw / "big.txt").write_text("x" * 50_000)
    docs, rows = ingest(raw, tmp_path / "out", IngestConfig(workers=1, max_file_bytes=10_000))
    assert len(docs) == 500
    assert [r["reason"] for r in rows.values()] == ["too_large"]  # the single-document file keeps its cap


# -- the user's columns --------------------------------------------------------------------------


def test_text_field_is_detected_and_configurable(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"content": ["from content"], "title": ["t"]}), raw / "a.parquet")
    (raw / "b.jsonl").write_text(json.dumps({"raw_content": "from raw_content", "id": "b1"}) + "\n")
    pq.write_table(pa.table({"body": ["from body"], "n": [1]}), raw / "c.parquet")
    docs, rows = ingest(raw, tmp_path / "out")
    texts = {s.rsplit("/", 1)[1]: d["text"] for s, d in docs.items()}
    assert texts == {"a.parquet#0": "from content", "b.jsonl#0": "from raw_content"}
    (row,) = rows.values()
    assert row["reason"] == "missing_text_column" and "body, n" in row["error"] and "text_field" in row["error"]

    docs, rows = ingest(raw, tmp_path / "set", IngestConfig(workers=1, text_field="body"))
    assert [d["text"] for d in docs.values()] == ["from body"]
    assert len(rows) == 2 and all("columns" in r["error"] or "fields" in r["error"] for r in rows.values())

    with pytest.warns(DeprecationWarning, match="text_field"):
        old_name = IngestConfig(workers=1, parquet_text_column="body")
    alias, _ = ingest(raw, tmp_path / "alias", old_name)
    assert [d["text"] for d in alias.values() if d["format"] == "parquet"] == ["from body"]


def test_meta_columns_default_to_short_scalars_and_can_be_chosen(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    table = pa.table({"text": ["hello world"], "url": ["https://x/1"], "id": ["d1"], "score": [0.5],
                      "language": ["en"], "dump": ["CC-2024"], "long": ["y" * 2000], "tags": [["a", "b"]]})
    pq.write_table(table, raw / "fw.parquet")
    docs, _ = ingest(raw, tmp_path / "out")
    (doc,) = docs.values()
    assert json.loads(doc["meta"]) == {"row": 0, "url": "https://x/1", "id": "d1", "score": 0.5, "language": "en",
                                       "dump": "CC-2024"}
    docs, _ = ingest(raw, tmp_path / "chosen", IngestConfig(workers=1, meta_fields=["url", "tags", "absent"]))
    assert json.loads(next(iter(docs.values()))["meta"]) == {"row": 0, "url": "https://x/1", "tags": ["a", "b"]}


def test_csv_tsv_and_arrow_are_read_by_record(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text('id,text\n1,"first, with comma"\n2,"two\nlines"\n3,\n4,fourth\n')
    (raw / "b.tsv").write_text("content\tlang\nalpha text\ten\nbeta text\tde\n")
    (raw / "c.csv.gz").write_bytes(gzip.compress(b"text\ngz one\ngz two\n"))
    table = pa.table({"text": ["arrow one", None, "arrow three"], "k": [1, 2, 3]})
    with pa.ipc.new_file(raw / "d.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=2)
    with pa.ipc.new_stream(raw / "e.ipc", table.schema) as w:
        w.write_table(table)
    docs, rows = ingest(raw, tmp_path / "out")
    by_name = {s.rsplit("/", 1)[1]: d for s, d in docs.items()}
    assert by_name["a.csv#1"]["text"] == "two\nlines" and json.loads(by_name["a.csv#1"]["meta"])["id"] == "2"
    assert {k for k in by_name if k.startswith("a.csv")} == {"a.csv#0", "a.csv#1", "a.csv#3"}
    assert by_name["b.tsv#1"]["text"] == "beta text" and json.loads(by_name["b.tsv#1"]["meta"])["lang"] == "de"
    assert by_name["c.csv.gz#1"]["text"] == "gz two"
    assert by_name["d.arrow#2"]["text"] == by_name["e.ipc#2"]["text"] == "arrow three"
    reasons = {s.rsplit("/", 1)[1]: r["reason"] for s, r in rows.items()}
    assert reasons == {"a.csv#2": "no_text", "d.arrow#1": "missing_text_field", "e.ipc#1": "missing_text_field"}


# -- work units ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_split_files_give_the_same_outputs_as_whole_ones(tmp_path: Path, workers: int) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = text_pool(3000, 40).to_pylist()
    pq.write_table(pa.table({"text": texts}), raw / "t.parquet", row_group_size=250)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[1234] = "{broken"
    (raw / "t.jsonl").write_text("\n".join(lines) + "\n")
    whole = run_ingest([str(raw)], tmp_path / "whole", CFG, progress=False)
    split_cfg = IngestConfig(workers=workers, batch_bytes=60_000)  # ~10 units per file
    split = run_ingest([str(raw)], tmp_path / "split", split_cfg, progress=False)
    a = read_table(document_files(tmp_path / "whole"))
    b = read_table(document_files(tmp_path / "split"))
    assert a.num_rows == b.num_rows == 2 * len(texts) - 1
    assert a.equals(b)  # same ids, sources (#n) and order, however the files were cut
    assert pq.read_table(tmp_path / "whole" / QUARANTINE_FILE).equals(pq.read_table(tmp_path / "split" / QUARANTINE_FILE))
    assert pq.read_table(tmp_path / "whole" / INDEX_FILE).equals(pq.read_table(tmp_path / "split" / INDEX_FILE))
    assert whole.counts == split.counts
