"""DuckDB views over a run's Parquet outputs, for questions asked in SQL.

Which views exist is declared with the stages (flows/stages.py: each stage
names its views, e.g. `ingest`, `dedup`, `filter` over their kept documents,
`quarantine`, `signals`, `shard_stats`, `provenance`); the catalog adds two
over every stage: `dropped` (every stage's dropped documents with the stage
and reason; ingest's are its quarantine rows) and `manifests` (one row per
completed stage). A view is created only where its files exist.

The catalog is read-only: questions, not changes. Only reading statements run
(`check_read_only`), and once the views are registered, DuckDB is locked to
reading files under the run root (no other paths, no network, no extension
installs, no settings changes), so a query cannot overwrite a stage's output or
reach outside the root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import duckdb

from refinery.storage.layout import RunLayout
from refinery.storage.manifest import read_manifest

# Statement kinds that only read. DESCRIBE, SUMMARIZE and SHOW parse as SELECT; EXPLAIN is checked on what it explains
# (EXPLAIN ANALYZE runs it).
READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA}
# PRAGMAs that only show something; others set options (e.g. profiling_output writes a file).
READ_PRAGMAS = {
    "show_tables", "show_tables_expanded", "table_info", "show", "version", "database_list", "database_size",
    "functions", "platform", "collations", "user_agent",
}  # fmt: skip
ALLOWED = "SELECT (with DESCRIBE, SUMMARIZE, SHOW), EXPLAIN of a SELECT, PRAGMA " + ", ".join(sorted(READ_PRAGMAS))


class ReadOnlyQueryError(ValueError):
    """A query the catalog refuses: it would write, change settings, or read outside the run root."""


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str, _explained: bool = False) -> None:
    """Raise ReadOnlyQueryError unless every statement of `sql` only reads."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error:
        if _explained:  # what an EXPLAIN wraps must be recognisably a read
            raise ReadOnlyQueryError(f"refused: EXPLAIN of `{sql.strip()[:120]}`; only EXPLAIN [ANALYZE] SELECT") from None
        return  # a syntax error: DuckDB reports it when the query runs
    for st in statements:
        text = " ".join(st.query.split())
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN and not _explained:
            inner = re.sub(r"^\s*explain(\s+analy[sz]e)?\s+", "", st.query, flags=re.IGNORECASE)
            check_read_only(con, inner, _explained=True)
            continue
        if _explained and kind != duckdb.StatementType.SELECT:
            pass  # EXPLAIN (ANALYZE runs it) only of a SELECT
        elif kind == duckdb.StatementType.PRAGMA:
            m = re.match(r"\s*pragma\s+(\w+)", st.query, flags=re.IGNORECASE)
            if m and m.group(1).lower() in READ_PRAGMAS and "=" not in st.query:
                continue
        elif kind in READ_STATEMENTS:
            continue
        raise ReadOnlyQueryError(
            f"refused: {kind.name} statement `{text[:120]}`; `refinery inspect` only reads (allowed: {ALLOWED})"
        )


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


class Catalog:
    """`views` are (view name, stage, glob inside the stage folder); `stages` every stage in graph order."""

    def __init__(self, root: str | Path, views: Sequence[tuple[str, str, str]], stages: Sequence[str]) -> None:
        self.layout = RunLayout.at(root)
        self.con = duckdb.connect()
        self.views: list[str] = []
        self._register(views, stages)
        self._lock()

    def _lock(self) -> None:
        """After the views exist: read files under the run root only, no network, no extensions, no SET."""
        allowed = str(self.layout.root).rstrip("/") + "/"  # the slash keeps `<root>2/` out
        self.con.execute("set allowed_directories = [" + "'" + allowed.replace("'", "''") + "']")
        self.con.execute("set autoinstall_known_extensions = false")
        self.con.execute("set enable_external_access = false")
        self.con.execute("set lock_configuration = true")

    def _view(self, name: str, paths: list[Path], union: bool = False) -> None:
        paths = [p for p in paths if p.is_file()]
        if not paths:
            return
        by_name = ", union_by_name = true" if union else ""
        self.con.execute(f"create or replace view {name} as select * from read_parquet({_sql_list(paths)}{by_name})")
        self.views.append(name)

    def _register(self, views: Sequence[tuple[str, str, str]], stages: Sequence[str]) -> None:
        for name, stage, pattern in views:
            self._view(name, sorted(p for p in self.layout.stage_dir(stage).glob(pattern) if not p.name.startswith(".")))
        dropped = [p for p in (self.layout.stage_dir(s) / "dropped.parquet" for s in stages) if p.is_file()]
        parts = [f"select id, source, stage, reason, detail from read_parquet({_sql_list(dropped)}, union_by_name = true)"] if dropped else []
        if "quarantine" in self.views:  # ingest's dropped records are its quarantine rows
            parts.append("select null::varchar as id, source, 'ingest' as stage, reason, error as detail from quarantine")
        if parts:
            self.con.execute("create or replace view dropped as " + " union all ".join(parts))
            self.views.append("dropped")
        rows = []
        for stage in stages:
            m = read_manifest(self.layout.stage_dir(stage))
            if m is not None:
                rows.append(
                    {
                        "stage": stage,
                        "docs_in": m.counts.in_,
                        "kept": m.counts.kept,
                        "dropped": m.counts.dropped_total,
                        "dropped_by_reason": json.dumps(m.counts.dropped),
                        "seconds": m.timings.get("total", 0.0),
                        "input_digest": m.input_digest,
                        "output_digest": m.output_digest,
                    }
                )
        if rows:
            import pyarrow as pa

            self._manifests = pa.Table.from_pylist(rows)
            self.con.register("manifests", self._manifests)
            self.views.append("manifests")

    def query(self, sql: str) -> duckdb.DuckDBPyRelation:
        """Run a read-only query; ReadOnlyQueryError for anything else (see `check_read_only`)."""
        check_read_only(self.con, sql)
        try:
            return self.con.sql(sql)
        except duckdb.PermissionException as exc:
            raise self._outside(exc) from exc

    def _outside(self, exc: duckdb.Error) -> ReadOnlyQueryError:
        return ReadOnlyQueryError(f"refused: only files under the run root {self.layout.root} can be read ({exc})")

    def overview_sql(self) -> str:
        if "manifests" in self.views:
            return "select stage, docs_in, kept, dropped, dropped_by_reason, round(seconds, 1) as seconds from manifests"
        return f"select '{self.views[0]}' as view, count(*) as rows from {self.views[0]}"

    def format(self, sql: str, limit: int = 20) -> str:
        rel = self.query(sql)
        if rel is None:
            return "ok"
        try:
            return str(rel.limit(limit)) if limit else str(rel)
        except duckdb.PermissionException as exc:  # a lazy relation reads its files only now
            raise self._outside(exc) from exc
