"""DuckDB views over the shards stage's per-document statistics (`stats.parquet`).

Views (all over the one Parquet file, nothing is loaded until queried):
- `shard_docs`: one row per encoded document (id, split, format, source, n_tokens, n_bytes).
- `tokens_by_format`: per split and document format: documents, tokens, bytes,
  tokens per document (mean, median, max) and bytes per token.
- `tokens_by_split`: the same per split.
- `tokens_by_source`: per split and raw source file (the `#n` record suffix removed).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

STATS_FILE = "stats.parquet"

_AGGREGATES = """
    count(*) AS documents,
    sum(n_tokens) AS tokens,
    sum(n_bytes) AS bytes,
    avg(n_tokens) AS mean_tokens_per_doc,
    median(n_tokens) AS median_tokens_per_doc,
    max(n_tokens) AS max_tokens_per_doc,
    sum(n_bytes) / nullif(sum(n_tokens), 0) AS bytes_per_token
"""


def register_views(con: duckdb.DuckDBPyConnection, shards_dir: str | os.PathLike[str]) -> None:
    """Create (or replace) the shard statistics views on `con`."""
    stats = Path(shards_dir) / STATS_FILE
    if not stats.is_file():
        raise FileNotFoundError(f"no {STATS_FILE} in {shards_dir}; run the shards stage first")
    path = str(stats).replace("'", "''")
    con.execute(f"CREATE OR REPLACE VIEW shard_docs AS SELECT * FROM read_parquet('{path}')")
    con.execute(
        f"CREATE OR REPLACE VIEW tokens_by_format AS SELECT split, format, {_AGGREGATES} "
        "FROM shard_docs GROUP BY split, format ORDER BY split, format"
    )
    con.execute(
        f"CREATE OR REPLACE VIEW tokens_by_split AS SELECT split, {_AGGREGATES} "
        "FROM shard_docs GROUP BY split ORDER BY split"
    )
    con.execute(
        "CREATE OR REPLACE VIEW tokens_by_source AS "
        f"SELECT split, regexp_replace(source, '#[0-9]+$', '') AS source_file, {_AGGREGATES} "
        "FROM shard_docs GROUP BY ALL ORDER BY split, source_file"
    )


def connect(shards_dir: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views registered."""
    con = duckdb.connect()
    register_views(con, shards_dir)
    return con


def tokens_by_format(shards_dir: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The `tokens_by_format` view as a list of rows, for reports and artifacts."""
    con = connect(shards_dir)
    try:
        cursor = con.execute("SELECT * FROM tokens_by_format")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()
