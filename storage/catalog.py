"""DuckDB views over a run's Parquet outputs, for questions asked in SQL.

Which views exist is declared with the stages (flows/stages.py: each stage
names its views, e.g. `ingest`, `dedup`, `filter` over their kept documents,
`quarantine`, `signals`, `shard_stats`, `provenance`); the catalog adds two
over every stage: `dropped` (every stage's dropped documents with the stage
and reason; ingest's are its quarantine rows) and `manifests` (one row per
completed stage). A view is created only where its files exist.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import duckdb

from refinery.storage.layout import RunLayout
from refinery.storage.manifest import read_manifest


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


class Catalog:
    """`views` are (view name, stage, glob inside the stage folder); `stages` every stage in graph order."""

    def __init__(self, root: str | Path, views: Sequence[tuple[str, str, str]], stages: Sequence[str]) -> None:
        self.layout = RunLayout.at(root)
        self.con = duckdb.connect()
        self.views: list[str] = []
        self._register(views, stages)

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
        return self.con.sql(sql)

    def overview_sql(self) -> str:
        if "manifests" in self.views:
            return "select stage, docs_in, kept, dropped, dropped_by_reason, round(seconds, 1) as seconds from manifests"
        return f"select '{self.views[0]}' as view, count(*) as rows from {self.views[0]}"

    def format(self, sql: str, limit: int = 20) -> str:
        rel = self.query(sql)
        if rel is None:
            return "ok"
        return str(rel.limit(limit)) if limit else str(rel)
