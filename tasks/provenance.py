"""Provenance: how many training tokens each raw source file, format and source root contributed.

The shards stage records, per encoded document, its split, format, raw source
and token count (`shards/stats.parquet`). This module folds that into one row
per raw source file of the training split, with the format and the source root
(which of the pipeline's `--source` arguments the file came from), so that

    select source_root, sum(tokens) from provenance group by 1

answers "what was this model trained on" in `refinery inspect`. The table's
token total is checked against the shards manifest's `train_tokens`: a
provenance table that does not add up is an error, not a report.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery.storage.atomic import atomic_path
from refinery.storage.manifest import OutputFile, describe_file, read_manifest
from refinery.storage.shard_stats import STATS_FILE
from refinery.tasks.ingest.sources import local_uri

PROVENANCE_FILE = "provenance.parquet"

PROVENANCE_SCHEMA = pa.schema(
    [
        pa.field("source_root", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("format", pa.string()),
        pa.field("documents", pa.int64()),
        pa.field("tokens", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("token_share", pa.float64()),
    ]
)


def source_roots(sources: list[str]) -> list[str]:
    """The pipeline's sources as URIs without a trailing slash, longest first (for prefix matching)."""
    roots = []
    for s in sources:
        uri = s if "://" in s else local_uri(os.path.expanduser(s))
        roots.append(uri.rstrip("/"))
    return sorted(set(roots), key=len, reverse=True)


def root_of(source_file: str, roots: list[str]) -> str:
    """The source a file was listed under; the file's own folder when no root contains it."""
    for r in roots:
        if source_file == r or source_file.startswith(r + "/"):
            return r
    return source_file.rsplit("/", 1)[0]


def provenance_table(shards_dir: str | os.PathLike[str], sources: list[str] | None = None) -> pa.Table:
    """Tokens, documents and text bytes of the training split per raw source file (largest first)."""
    stats = Path(shards_dir) / STATS_FILE
    if not stats.is_file():
        raise FileNotFoundError(f"no {STATS_FILE} in {shards_dir}; run the shards stage first (refinery run --stages shards)")
    path = str(stats).replace("'", "''")
    con = duckdb.connect()
    try:
        rows = con.execute(
            f"""
            select regexp_replace(source, '#[0-9]+$', '') as source_file, format,
                   count(*) as documents, sum(n_tokens) as tokens, sum(n_bytes) as bytes
            from read_parquet('{path}') where split = 'train'
            group by all order by tokens desc, source_file, format
            """
        ).fetchall()
    finally:
        con.close()
    roots = source_roots(sources or [])
    total = sum(r[3] for r in rows)
    return pa.Table.from_pylist(
        [
            {
                "source_root": root_of(f, roots),
                "source_file": f,
                "format": fmt,
                "documents": int(docs),
                "tokens": int(tokens),
                "bytes": int(nbytes),
                "token_share": tokens / total if total else 0.0,
            }
            for f, fmt, docs, tokens, nbytes in rows
        ],
        schema=PROVENANCE_SCHEMA,
    )


def write_provenance(
    shards_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], sources: list[str] | None = None
) -> OutputFile:
    """Write `provenance.parquet` into `out_dir` (atomically) after checking it against the shards manifest."""
    table = provenance_table(shards_dir, sources)
    manifest = read_manifest(shards_dir)
    total = int(pc.sum(table.column("tokens")).as_py() or 0)
    if manifest is not None and "train_tokens" in manifest.extra and total != manifest.extra["train_tokens"]:
        raise RuntimeError(
            f"provenance counts {total} training tokens but the shards manifest records "
            f"{manifest.extra['train_tokens']}; {shards_dir}/{STATS_FILE} is out of step with the shards: "
            "re-run the shards stage (refinery run --from shards)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / PROVENANCE_FILE
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return describe_file(out_dir, target, rows=table.num_rows)


def summarize(table: pa.Table, by: str) -> list[dict[str, object]]:
    """Totals per `by` (`format` or `source_root`), largest first: rows for reports and artifacts."""
    if by not in ("format", "source_root", "source_file"):
        raise ValueError(f"summarize by format, source_root or source_file, not {by!r}")
    grouped = table.group_by(by).aggregate([("documents", "sum"), ("tokens", "sum"), ("bytes", "sum")])
    total = sum(grouped.column("tokens_sum").to_pylist()) or 1
    rows = [
        {by: r[by], "documents": r["documents_sum"], "tokens": r["tokens_sum"], "bytes": r["bytes_sum"],
         "token_share": r["tokens_sum"] / total}
        for r in grouped.to_pylist()
    ]
    return sorted(rows, key=lambda r: -int(r["tokens"]))  # type: ignore[call-overload]
