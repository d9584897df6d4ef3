"""`refinery inspect` only reads: no writes, no network, no files outside the run root.

A run root made by the declared ingest, dedup and filter stage functions (no
Prefect, no MLflow) is queried through the real command line: `COPY ... TO`
(over a stage output and elsewhere), `ATTACH`, `INSTALL`, `LOAD`, `SET`, and
reading a file outside the root are each refused with a clear message and exit
code 2; ordinary selects on the views still work; the stage output is unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_lineage_graph import TINY, run_chain, write_corpus
from typer.testing import CliRunner

from refinery.flows.cli import app
from refinery.flows.config import validate_config
from refinery.flows.stages import PIPELINE
from refinery.storage.catalog import ReadOnlyQueryError

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("inspect")
    sources = write_corpus(base / "corpus")
    run_chain(base / "run", sources, validate_config(TINY), stages=("ingest", "dedup", "filter"))
    (base / "outside.txt").write_text("a secret outside the run root\n")
    return base / "run"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _inspect(root: Path, sql: str):
    return runner.invoke(app, ["inspect", sql, "--root", str(root)])


def test_selects_on_the_views_still_work(root) -> None:
    result = _inspect(root, "select count(*) as n from filter")
    assert result.exit_code == 0, result.output
    kept = PIPELINE.catalog(root).query("select count(*) from filter").fetchall()[0][0]
    assert kept > 0 and f"{kept}" in result.output
    for sql in ("describe filter", "summarize dedup", "show tables", "explain select * from ingest",
                "select stage, count(*) from dropped group by 1", "select * from manifests", "pragma show_tables"):
        result = _inspect(root, sql)
        assert result.exit_code == 0, (sql, result.output)
    # A file under the root can still be read directly.
    part = next((root / "filter").glob("*.parquet"))
    assert _inspect(root, f"select count(*) from read_parquet('{part}')").exit_code == 0


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("copy (select 1 as id) to '{part}'", "COPY"),
        ("copy (select * from filter) to '{outside_dir}/copy.csv'", "COPY"),
        ("select 1; copy (select 1 as id) to '{part}'", "COPY"),
        ("explain analyze copy (select 1 as id) to '{part}'", "COPY"),
        ("attach '{outside_dir}/x.duckdb' as x", "ATTACH"),
        ("install httpfs", "LOAD"),
        ("load httpfs", "LOAD"),
        ("set enable_external_access = true", "SET"),
        ("create table t as select * from filter", "CREATE"),
        ("export database '{outside_dir}/export'", "EXPORT"),
        ("pragma profiling_output = '{outside_dir}/profile.txt'", "SET"),
        ("pragma enable_profiling", "PRAGMA"),
    ],
)
def test_writes_and_network_are_refused(root, sql: str, expected: str) -> None:
    part = next((root / "filter").glob("*.parquet"))
    before = _digests(root)
    result = _inspect(root, sql.format(part=part, outside_dir=root.parent))
    assert result.exit_code == 2, result.output
    assert f"refused: {expected} statement" in result.output and "only reads" in result.output
    assert _digests(root) == before
    assert not list(root.parent.glob("copy.csv")) and not (root.parent / "x.duckdb").exists()


@pytest.mark.parametrize("reader", ["read_text", "read_csv", "read_blob"])
def test_files_outside_the_root_are_refused(root, reader: str) -> None:
    outside = root.parent / "outside.txt"
    result = _inspect(root, f"select * from {reader}('{outside}')")
    assert result.exit_code == 2, result.output
    assert "only files under the run root" in result.output and "secret" not in result.output


def test_the_catalog_refuses_in_python_too(root) -> None:
    catalog = PIPELINE.catalog(root)
    with pytest.raises(ReadOnlyQueryError, match="COPY"):
        catalog.query(f"copy (select 1) to '{root.parent / 'x.parquet'}'")
    with pytest.raises(ReadOnlyQueryError, match="run root"):
        catalog.query(f"select * from read_text('{root.parent / 'outside.txt'}')").fetchall()
    assert catalog.query("select count(*) from ingest").fetchall()[0][0] > 0
