"""Storage contracts: atomic writes, manifests and their digest chain, document tables."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import BaseModel

from refinery.storage.atomic import TMP_PREFIX, atomic_path, atomic_write_text, sweep_temporaries
from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, count_rows, document_files, iter_batches
from refinery.storage.manifest import (
    Counts,
    StageResult,
    build_manifest,
    read_manifest,
    verify_outputs,
    write_manifest,
)


class _Cfg(BaseModel):
    threshold: float = 0.5


def _docs(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"d{i}", "text": f"text {i}", "source": f"file:///x#{i}", "format": "text", "bytes": 6, "meta": "{}"}
        for i in range(start, start + n)
    ]


def test_atomic_write_leaves_no_partial_file(tmp_path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_sweep_removes_leftovers(tmp_path) -> None:
    (tmp_path / f"{TMP_PREFIX}part-00000.parquet.abc").write_bytes(b"x")
    (tmp_path / "part-00000.parquet").write_bytes(b"y")
    assert sweep_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]


def test_part_writer_rolls_and_reads_back(tmp_path) -> None:
    w = PartWriter(tmp_path, schema=DOCUMENT_SCHEMA, rows_per_part=10)
    w.write(_docs(15))
    w.write(_docs(7, 15))
    outputs = w.close()
    files = document_files(tmp_path)
    assert [o.path for o in outputs] == [f.name for f in files]
    assert count_rows(files) == 22
    ids = [i for b in iter_batches(files, columns=["id"]) for i in b.column("id").to_pylist()]
    assert ids == [f"d{i}" for i in range(22)]


def test_empty_part_writer_writes_valid_empty_table(tmp_path) -> None:
    outputs = PartWriter(tmp_path, schema=DOCUMENT_SCHEMA).close()
    assert len(outputs) == 1 and outputs[0].rows == 0
    assert count_rows(document_files(tmp_path)) == 0


def test_counts_must_add_up() -> None:
    Counts(**{"in": 5, "kept": 3, "dropped": {"a": 2}}).check("x")
    with pytest.raises(ValueError, match="do not add up"):
        Counts(**{"in": 5, "kept": 3, "dropped": {"a": 1}}).check("x")


def test_manifest_round_trip_and_digest_chain(tmp_path) -> None:
    w = PartWriter(tmp_path, schema=DOCUMENT_SCHEMA)
    w.write(pa.Table.from_pylist(_docs(3), schema=DOCUMENT_SCHEMA))
    result = StageResult(outputs=w.close(), counts=Counts(**{"in": 3, "kept": 3}))
    cfg = _Cfg()
    m1 = build_manifest("dedup", cfg, "a" * 64, result, {"total": 1.0})
    write_manifest(tmp_path, m1)
    back = read_manifest(tmp_path)
    assert back == m1 and verify_outputs(tmp_path, back)
    assert back.matches("a" * 64, m1.config_hash) and not back.matches("b" * 64, m1.config_hash)
    # the output digest folds in the input digest: same bytes from other inputs is other lineage
    m2 = build_manifest("dedup", cfg, "b" * 64, result, {"total": 1.0})
    assert m2.output_digest != m1.output_digest
    (tmp_path / result.outputs[0].path).write_bytes(b"truncated")
    assert not verify_outputs(tmp_path, back)


def test_same_rows_give_same_bytes_whatever_the_batching(tmp_path) -> None:
    """Row groups and part boundaries depend on the rows alone: a resumed run writes identical files."""
    rows = _docs(57)
    a = PartWriter(tmp_path / "a", schema=DOCUMENT_SCHEMA, rows_per_part=20, row_group_size=7)
    a.write(rows)
    b = PartWriter(tmp_path / "b", schema=DOCUMENT_SCHEMA, rows_per_part=20, row_group_size=7)
    for i in range(0, 57, 5):
        b.write(rows[i : i + 5])
    out_a, out_b = a.close(), b.close()
    assert [o.rows for o in out_a] == [20, 20, 17]
    assert [(o.path, o.sha256) for o in out_a] == [(o.path, o.sha256) for o in out_b]
