"""Provenance: training tokens per source file, format and source root sum exactly to the shards' count."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, document_files
from refinery.storage.manifest import build_manifest, write_manifest
from refinery.tasks.encode import ShardsConfig, run_encode
from refinery.tasks.ingest.sources import local_uri
from refinery.tasks.provenance import (
    PROVENANCE_FILE,
    provenance_table,
    root_of,
    source_roots,
    summarize,
    write_provenance,
)
from refinery.tasks.tokenizer import TokenizerConfig, run_train_tokenizer

WORDS = "alpha beta gamma delta river stone bridge market def class return import print value".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Curated documents from two source roots (several records per file), a tokenizer and shards."""
    base = tmp_path_factory.mktemp("prov")
    roots = [str(base / "src" / "books"), str(base / "src" / "code")]
    rows = []
    for r, (root, fmt) in enumerate(zip(roots, ("text", "code"), strict=True)):
        for f in range(4):
            for rec in range(5 if fmt == "text" else 1):
                text = " ".join(WORDS[(r * 7 + f * 3 + rec + k) % len(WORDS)] for k in range(40 + 13 * f + rec))
                source = f"{local_uri(root)}/file-{f}.{'txt' if fmt == 'text' else 'py'}#{rec}"
                rows.append({"id": f"{r}-{f}-{rec}", "text": text, "source": source, "format": fmt,
                             "bytes": len(text), "meta": "{}"})
    writer = PartWriter(base / "filter", DOCUMENT_SCHEMA)
    writer.write(rows)
    writer.close()
    files = document_files(base / "filter")
    run_train_tokenizer(files, base / "tokenizer", TokenizerConfig(vocab_size=300, val_fraction=0.3), progress=False)
    cfg = ShardsConfig(val_fraction=0.3)
    result = run_encode(files, base / "tokenizer" / "tokenizer.json", base / "shards", cfg, progress=False)
    write_manifest(base / "shards", build_manifest("shards", cfg, "in", result, {}))
    return base, roots, result


def test_tokens_sum_exactly_to_the_training_shards(shards, tmp_path: Path) -> None:
    base, roots, result = shards
    out = write_provenance(base / "shards", tmp_path, sources=roots)
    table = pq.read_table(tmp_path / PROVENANCE_FILE)
    assert out.rows == table.num_rows and out.path == PROVENANCE_FILE
    total = sum(table.column("tokens").to_pylist())
    assert total == result.extra["train_tokens"] > 0
    # ...and to the tokens actually stored in the training shard files (end-of-text included)
    stored = 0
    for name in result.extra["train_files"]:
        with ipc.open_file(base / "shards" / name) as reader:
            stored += sum(len(v) for v in reader.read_all().column("input_ids").to_pylist())
    assert total == stored
    assert sum(table.column("token_share").to_pylist()) == pytest.approx(1.0)
    assert sum(table.column("documents").to_pylist()) == result.extra["train_documents"]


def test_per_file_format_and_root(shards) -> None:
    base, roots, result = shards
    table = provenance_table(base / "shards", roots)
    files = table.column("source_file").to_pylist()
    assert all("#" not in f for f in files) and len(set(files)) == len(files)
    assert set(table.column("source_root").to_pylist()) <= {local_uri(r) for r in roots}
    by_format = {r["format"]: r["tokens"] for r in summarize(table, "format")}
    by_root = {r["source_root"]: r["tokens"] for r in summarize(table, "source_root")}
    assert sum(by_format.values()) == sum(by_root.values()) == result.extra["train_tokens"]
    assert set(by_format) <= {"text", "code"}
    for row in table.to_pylist():  # a file's root is the source it sits under; .py files are code
        assert row["source_file"].startswith(row["source_root"] + "/")
        assert row["format"] == ("code" if row["source_file"].endswith(".py") else "text")
    with pytest.raises(ValueError, match="summarize by"):
        summarize(table, "colour")


def test_queryable_in_sql(shards, tmp_path: Path) -> None:
    base, roots, result = shards
    write_provenance(base / "shards", tmp_path, sources=roots)
    con = duckdb.connect()
    got = con.execute(f"select sum(tokens) from read_parquet('{tmp_path / PROVENANCE_FILE}')").fetchone()[0]
    assert got == result.extra["train_tokens"]


def test_roots_and_errors(tmp_path: Path) -> None:
    roots = source_roots(["/data/a", "/data/a/b", "s3://bucket/x/"])
    assert roots[0].endswith("/data/a/b") and "s3://bucket/x" in roots
    assert root_of("file:///data/a/b/c.txt", roots) == "file:///data/a/b"
    assert root_of("file:///data/ab/c.txt", roots) == "file:///data/ab"  # not under /data/a
    assert root_of("s3://bucket/x/y/z.txt", roots) == "s3://bucket/x"
    with pytest.raises(FileNotFoundError, match="run the shards stage"):
        provenance_table(tmp_path)


def test_a_stats_file_out_of_step_with_the_manifest_is_an_error(shards, tmp_path: Path) -> None:
    base, roots, _ = shards
    import shutil

    broken = tmp_path / "shards"
    shutil.copytree(base / "shards", broken)
    stats = pq.read_table(broken / "stats.parquet")
    train_rows = [i for i, split in enumerate(stats.column("split").to_pylist()) if split == "train"]
    keep = [i for i in range(stats.num_rows) if i != train_rows[0]]  # one training document fewer
    pq.write_table(stats.take(pa.array(keep)), broken / "stats.parquet")
    with pytest.raises(RuntimeError, match="out of step"):
        write_provenance(broken, tmp_path / "out", roots)
