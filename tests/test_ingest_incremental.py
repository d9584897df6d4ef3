"""Incremental runs, the source fingerprint, executors, URIs and config validation."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pydantic
import pytest

from refinery.storage.documents import document_files, read_table
from refinery.tasks.ingest import INDEX_FILE, QUARANTINE_FILE, IngestConfig, run_ingest, source_digest
from refinery.tasks.ingest.sources import local_uri

CFG = IngestConfig(workers=1)


def write_folder(root: Path, n: int = 6) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"document number {i}, with some words in it.\n")
    (root / "records.jsonl").write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(3)) + "\n{bad\n")
    (root / "empty.md").write_bytes(b"")


def table(stage: Path) -> dict[str, str]:
    return {r["source"]: r["text"] for r in read_table(document_files(stage)).to_pylist()}


def test_second_run_parses_exactly_the_new_and_changed_files(tmp_path: Path) -> None:
    raw, stage = tmp_path / "raw", tmp_path / "ingest"
    write_folder(raw)
    first = run_ingest([str(raw)], stage, CFG, progress=False)
    assert first.metrics["files_new"] == 8
    before = table(stage)

    (raw / "added1.txt").write_text("a new file")
    (raw / "added2.md").write_text("# another new file")
    (raw / "doc3.txt").write_text("doc3 was rewritten")
    os.utime(raw / "doc4.txt", ns=(1, 1))  # touched only: same content, new mtime
    second = run_ingest([str(raw)], stage, CFG, progress=False)

    m = second.metrics
    # Exactly the new and changed files were read: their bytes, no others.
    assert m["bytes_parsed"] == sum((raw / n).stat().st_size for n in ("added1.txt", "added2.md", "doc3.txt"))
    assert (m["files_new"], m["files_changed"], m["files_unchanged"], m["files_removed"]) == (2, 1, 7, 0)
    after = table(stage)
    assert after[local_uri(str(raw / "doc3.txt"))] == "doc3 was rewritten"
    assert after[local_uri(str(raw / "added1.txt"))] == "a new file"
    for source, text in before.items():  # carried over, untouched, no duplicates
        if "doc3" not in source:
            assert after[source] == text
    assert len(after) == len(before) + 2
    assert second.counts.dropped == first.counts.dropped == {"empty": 1, "invalid_json": 1}
    assert second.counts.in_ == first.counts.in_ + 2
    assert not (stage / ".previous").exists()


def test_removed_files_disappear_and_unchanged_rerun_parses_nothing(tmp_path: Path) -> None:
    raw, stage = tmp_path / "raw", tmp_path / "ingest"
    write_folder(raw)
    run_ingest([str(raw)], stage, CFG, progress=False)
    (raw / "doc0.txt").unlink()
    (raw / "records.jsonl").unlink()
    again = run_ingest([str(raw)], stage, CFG, progress=False)
    assert again.metrics["files_removed"] == 2
    assert again.metrics["docs_parsed"] == 0
    assert again.counts.dropped == {"empty": 1}
    assert not any("doc0" in s or "records" in s for s in table(stage))
    assert again.metrics["bytes_parsed"] == 0
    index = pq.read_table(stage / INDEX_FILE).to_pylist()
    assert sorted(r["rel"] for r in index) == sorted(p.name for p in raw.iterdir())
    rows = pq.read_table(stage / QUARANTINE_FILE).to_pylist()
    assert [r["reason"] for r in rows] == ["empty"]


def test_changed_parse_settings_reparse_everything(tmp_path: Path) -> None:
    raw, stage = tmp_path / "raw", tmp_path / "ingest"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"text": "t", "body": "the body"}) + "\n")
    run_ingest([str(raw)], stage, CFG, progress=False)
    second = run_ingest([str(raw)], stage, IngestConfig(workers=1, jsonl_text_field="body"), progress=False)
    assert second.metrics["files_changed"] == 1
    assert list(table(stage).values()) == ["the body"]


def test_source_digest_tracks_names_sizes_mtimes_and_config(tmp_path: Path) -> None:
    write_folder(tmp_path / "raw")
    d1 = source_digest([str(tmp_path / "raw")], CFG)
    assert d1 == source_digest([str(tmp_path / "raw")], CFG)
    assert d1 != source_digest([str(tmp_path / "raw")], IngestConfig(workers=1, max_file_bytes=10))
    (tmp_path / "raw" / "new.txt").write_text("x")
    assert d1 != source_digest([str(tmp_path / "raw")], CFG)


def test_include_exclude_globs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "keep" / "deep").mkdir(parents=True)
    (raw / "keep" / "deep" / "a.txt").write_text("alpha")
    (raw / "keep" / "b.log").write_text("beta")
    (raw / "__pycache__").mkdir()
    (raw / "__pycache__" / "c.txt").write_text("cached")
    (raw / ".git").mkdir()
    (raw / ".git" / "HEAD").write_text("ref")
    cfg = IngestConfig(workers=1, include=["**/*.txt", "**/*.log"], exclude=["**/*.log", "**/__pycache__/**", "**/.*/**"])
    run_ingest([str(raw)], tmp_path / "out", cfg, progress=False)
    assert list(table(tmp_path / "out").values()) == ["alpha"]


def test_executor_and_process_pool_give_identical_outputs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_folder(raw, n=12)
    (raw / "notes.txt.gz").write_bytes(gzip.compress(b"compressed notes"))
    small = {"batch_files": 2}  # 7+ batches: enough for the stage to start its own pool
    inproc = run_ingest([str(raw)], tmp_path / "a", IngestConfig(workers=1, **small), progress=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        threaded = run_ingest([str(raw)], tmp_path / "b", IngestConfig(workers=1, **small), progress=False,
                              executor=pool)
    pooled = run_ingest([str(raw)], tmp_path / "c", IngestConfig(workers=2, **small), progress=False)
    ref = read_table(document_files(tmp_path / "a"))
    for other in ("b", "c"):
        assert read_table(document_files(tmp_path / other)).equals(ref)
        assert pq.read_table(tmp_path / other / QUARANTINE_FILE).equals(pq.read_table(tmp_path / "a" / QUARANTINE_FILE))
    assert inproc.counts == threaded.counts == pooled.counts


def test_fsspec_memory_uri_and_single_file_sources(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/x.txt", b"from memory")
    fs.pipe("/corpus/sub/y.jsonl", b'{"text": "memory record"}\n')
    single = tmp_path / "single.md"
    single.write_text("# Single file")
    try:
        result = run_ingest(["memory://corpus", str(single)], tmp_path / "out", CFG, progress=False)
    finally:
        fs.rm("/corpus", recursive=True)
    docs = table(tmp_path / "out")
    assert docs == {"memory:///corpus/x.txt": "from memory", "memory:///corpus/sub/y.jsonl#0": "memory record",
                    local_uri(str(single)): "# Single file"}
    assert result.counts.kept == 3


def test_missing_source_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_ingest([str(tmp_path / "nope")], tmp_path / "out", CFG, progress=False)


def test_bad_config_values_name_the_key() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_file_bytes"):
        IngestConfig(max_file_bytes=0)
    with pytest.raises(pydantic.ValidationError, match="file_timeout_s"):
        IngestConfig(file_timeout_s=-1)
    with pytest.raises(pydantic.ValidationError, match="colour"):
        IngestConfig(colour="blue")


def test_stage_directory_inside_a_source_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("only document")
    for _ in range(2):
        result = run_ingest(str(tmp_path), tmp_path / "out", CFG, progress=False)
    assert result.metrics["files"] == 1
    assert list(table(tmp_path / "out").values()) == ["only document"]
