"""The dedup stage: exact and near-duplicate removal with MinHash LSH.

Per batch (pure, parallel through `executor`): normalise the text, hash it for
exact matching, shingle it into word n-grams and compute its MinHash signature
(`refinery.tasks.minhash`, bit-identical to datasketch's `MinHash`). The
signatures and their LSH band keys go to Parquet files under the stage
directory.

Globally (in DuckDB, over those files, so it spills to disk past memory):
exact groups by content hash; band collisions -> candidate pairs -> optional
exact Jaccard check on the shingle sets -> connected components -> one kept
document per cluster, the one with the smallest source URI (the survivor rule). Kept
documents get a `minhash_cluster` column: the cluster id shared by a kept
document and the duplicates removed in its favour, null when it had none.

Incremental runs equal fresh runs: every decision is taken over the current
input alone, so a document edited, deleted or renamed since the last run, or a
changed threshold, gives exactly what a new run root would. What carries over
is only a cache: `signatures.parquet` holds the id, content hash and signature
of every document of the last run's input, and a document whose id and content
hash are there reuses its signature instead of recomputing it (the costly part).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from refinery.storage.atomic import atomic_write_json
from refinery.storage.documents import (
    DROPPED_SCHEMA,
    ROW_GROUP_SIZE,
    ParquetWriter,
    PartWriter,
    count_rows,
    document_files,
    dropped_rows,
    iter_batches,
)
from refinery.storage.manifest import Counts, StageResult, describe_file, file_sha256
from refinery.tasks.minhash import MinHasher, band_hashes, exact_jaccard, optimal_bands, shingle_hashes
from refinery.tasks.normalize import NormalizeConfig, join_words, normalize_words, text_hashes
from refinery.tasks.parallel import map_in_order

STAGE = "dedup"
SIGNATURES = "signatures.parquet"
SIGNATURES_KEY = "signatures.json"
DROPPED = "dropped.parquet"
WORK = ".work"


class DedupConfig(BaseModel):
    """Settings of the dedup stage. `bands`/`rows` are derived from `threshold` unless both are set."""

    model_config = ConfigDict(extra="forbid")

    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    exact: bool = True
    near: bool = True
    shingle_size: int = Field(5, ge=1, le=32)
    threshold: float = Field(0.8, gt=0.0, lt=1.0)
    num_perm: int = Field(128, ge=2, le=1024)
    bands: int | None = Field(None, ge=1)
    rows: int | None = Field(None, ge=1)
    seed: int = Field(1, ge=0)
    batch_size: int = Field(10_000, ge=1)
    verify_jaccard: bool = True
    max_bucket_pairs: int = Field(64, ge=2, description="buckets up to this size give all their pairs, larger ones a star")
    duckdb_memory_limit: str = "2GB"

    @model_validator(mode="after")
    def _check_bands(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("bands and rows: set both, or neither to derive them from threshold")
        if self.bands is not None and self.bands * self.rows > self.num_perm:  # type: ignore[operator]
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")  # type: ignore[operator]
        return self

    def lsh_params(self) -> tuple[int, int]:
        """(bands, rows). Derived ones favour recall when pairs are verified, since verification removes false positives."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        weight_fn = 0.9 if self.verify_jaccard else 0.5
        return optimal_bands(self.threshold, self.num_perm, false_negative_weight=weight_fn)

    def signature_key(self) -> dict[str, Any]:
        """The settings a stored signature depends on; a different key makes stored signatures unusable."""
        return {
            "normalize": self.normalize.model_dump(),
            "shingle_size": self.shingle_size,
            "num_perm": self.num_perm,
            "seed": self.seed,
            "scheme": "datasketch-affine32",
        }


@functools.lru_cache(maxsize=8)
def _hasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def signature_batch(
    texts: pa.Array, known_hashes: list[bytes | None], cfg: DedupConfig
) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]:
    """Content hashes of every text, and MinHash signatures of those not already known.

    Returns `(hashes, computed_rows, signatures, has_shingles)`: signatures are
    computed only for rows whose hash differs from `known_hashes[row]`.
    """
    words = normalize_words(texts, cfg.normalize)
    hashes = text_hashes(join_words(words))
    rows = np.array([i for i, (h, k) in enumerate(zip(hashes, known_hashes, strict=True)) if h != k], dtype=np.int64)
    if len(rows) == 0 or not cfg.near:
        return hashes, rows, np.empty((len(rows), cfg.num_perm), np.uint32), np.zeros(len(rows), bool)
    sub = words if len(rows) == len(words) else words.take(pa.array(rows))
    shingles, offsets = shingle_hashes(sub, cfg.shingle_size)
    sigs = _hasher(cfg.num_perm, cfg.seed).signatures(shingles, offsets)
    return hashes, rows, sigs, np.diff(offsets) > 0


def cluster_id(doc_id: str) -> int:
    """Stable int64 cluster id derived from the id of the document a cluster keeps."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class _Index:
    """The signature cache of the previous run: `signatures.parquet` in the stage directory.

    It holds the id, content hash and signature of every document of the last
    run's input. It is only a cache: a document whose id and content hash are
    in it reuses its signature, and nothing else about the last run carries
    over. A cache made with other signature settings, or whose bytes no longer
    match the checksum recorded beside it, is ignored (and rebuilt).
    """

    def __init__(self, stage_dir: Path, cfg: DedupConfig) -> None:
        self.path = stage_dir / SIGNATURES
        self.by_id: dict[str, tuple[int, bytes]] = {}
        self.size = 0
        self.ignored = ""
        if not self.path.is_file():
            return
        key_path = stage_dir / SIGNATURES_KEY
        try:
            stored = json.loads(key_path.read_text()) if key_path.is_file() else None
        except ValueError:
            stored = None
        if not isinstance(stored, dict) or stored.get("settings") != cfg.signature_key():
            self.ignored = "other signature settings"
            return
        if stored.get("sha256") != file_sha256(self.path):
            self.ignored = "checksum mismatch"
            return
        table = pq.read_table(self.path, columns=["id", "text_hash"])
        ids = table.column("id").to_pylist()
        hashes = table.column("text_hash").to_pylist()
        self.by_id = {i: (n, h) for n, (i, h) in enumerate(zip(ids, hashes, strict=True))}
        self.size = len(ids)


def run_dedup(
    input_files: list[Path],
    stage_dir: Path,
    cfg: DedupConfig,
    progress: bool = True,
    executor: Executor | None = None,
) -> StageResult:
    """Remove exact and near duplicates from `input_files`, writing the stage outputs in `stage_dir`."""
    t0 = time.perf_counter()
    input_files = [Path(p) for p in input_files]
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    work = stage_dir / WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        index = _Index(stage_dir, cfg)
        bands, rows = cfg.lsh_params()
        n_in = count_rows(input_files)
        stats = _signature_pass(input_files, work, cfg, index, bands, rows, n_in, progress, executor)
        t_sig = time.perf_counter()
        con = duckdb.connect()  # in memory; spills to temp_directory past memory_limit
        con.execute(f"SET memory_limit = '{cfg.duckdb_memory_limit}'")
        con.execute(f"SET temp_directory = '{work / 'spill'}'")
        decisions, global_stats = _global_step(con, work, cfg, input_files, progress)
        t_global = time.perf_counter()
        outputs, kept, dropped = _write_outputs(input_files, stage_dir, decisions, cfg, progress)
        outputs += _write_index(con, work, stage_dir, cfg)
        con.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = Counts(**{"in": n_in}, kept=kept, dropped={k: v for k, v in dropped.items() if v})
    counts.check(STAGE)
    elapsed = time.perf_counter() - t0
    metrics = {
        "docs_per_s": n_in / elapsed if elapsed > 0 else 0.0,
        "seconds_signatures": t_sig - t0,
        "seconds_global": t_global - t_sig,
        "bands": float(bands),
        "rows": float(rows),
        **{k: float(v) for k, v in stats.items()},
        **{k: float(v) for k, v in global_stats.items()},
        "exact_duplicates": float(dropped.get("exact_duplicate", 0)),
        "near_duplicates": float(dropped.get("near_duplicate", 0)),
    }
    extra: dict[str, Any] = {"bands": bands, "rows": rows}
    if index.ignored:
        extra["signature_cache_ignored"] = index.ignored
    return StageResult(outputs=outputs, counts=counts, metrics=metrics, extra=extra)


def _signature_pass(
    input_files: list[Path],
    work: Path,
    cfg: DedupConfig,
    index: _Index,
    bands: int,
    rows: int,
    n_in: int,
    progress: bool,
    executor: Executor | None,
) -> dict[str, int]:
    """Hash and sign every input document (reusing cached signatures); write the work tables.

    A document is identified by its input row from here on, so every decision
    depends on the current input alone.
    """
    node_schema = pa.schema(
        [("row", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("text_hash", pa.binary())]
    )
    sig_type = pa.list_(pa.uint32(), cfg.num_perm)
    sig_schema = pa.schema([("row", pa.int64()), ("signature", sig_type)])
    band_schema = pa.schema([("row", pa.int64()), ("band", pa.int16()), ("key", pa.int64())])
    nodes_w = ParquetWriter(work / "nodes.parquet", node_schema)
    sigs_w = ParquetWriter(work / "sigs.parquet", sig_schema)
    bands_w = ParquetWriter(work / "bands.parquet", band_schema)
    computed = 0

    def write_sigs(row: np.ndarray, sigs: np.ndarray, has: np.ndarray) -> None:
        if not cfg.near or len(row) == 0:
            return
        flat = pa.array(sigs.reshape(-1), pa.uint32())
        sigs_w.write(pa.table({"row": row, "signature": pa.FixedSizeListArray.from_arrays(flat, cfg.num_perm)},
                              schema=sig_schema))
        row, sigs = row[has], sigs[has]  # a document without shingles has no bands: it can only be an exact duplicate
        if len(row) == 0:
            return
        keys = band_hashes(sigs, bands, rows)
        bands_w.write(
            pa.table(
                {
                    "row": np.repeat(row, bands),
                    "band": np.tile(np.arange(bands, dtype=np.int16), len(row)),
                    "key": keys.reshape(-1),
                },
                schema=band_schema,
            )
        )

    def batches() -> Iterator[tuple[Any, ...]]:
        for batch in iter_batches(input_files, columns=["id", "text"], batch_size=cfg.batch_size):
            ids = batch.column("id").to_pylist()
            known = [index.by_id.get(i, (None, None))[1] for i in ids]
            yield (batch.column("text"), known, cfg)

    row_of_cached = np.full(index.size, -1, dtype=np.int64)  # cache entry -> the input row reusing it
    row0 = 0
    bar = tqdm(total=n_in, desc="dedup: signatures", unit="doc", disable=not progress)
    id_batches = iter_batches(input_files, columns=["id", "source"], batch_size=cfg.batch_size)
    for (hashes, comp_rows, sigs, has), id_batch in zip(map_in_order(signature_batch, batches(), executor), id_batches, strict=True):
        ids = id_batch.column("id").to_pylist()
        n = len(ids)
        row = row0 + np.arange(n, dtype=np.int64)
        computed_mask = np.zeros(n, bool)
        computed_mask[comp_rows] = True
        for i in np.flatnonzero(~computed_mask):
            row_of_cached[index.by_id[ids[i]][0]] = row[i]
        nodes_w.write(
            pa.table({"row": row, "id": ids, "source": id_batch.column("source"), "text_hash": hashes},
                     schema=node_schema)
        )
        write_sigs(row[comp_rows], sigs, has)
        computed += len(comp_rows)
        row0 += n
        bar.update(n)
    bar.close()
    reused = int((row_of_cached >= 0).sum())
    if reused and cfg.near:
        start = 0
        for batch in iter_batches([index.path], columns=["signature"]):
            n = batch.num_rows
            target = row_of_cached[start : start + n]
            take = np.flatnonzero(target >= 0)
            if len(take):
                sigs = batch.column("signature").flatten().to_numpy().reshape(n, cfg.num_perm)[take]
                has = ~(sigs == np.uint32(0xFFFFFFFF)).all(axis=1)
                write_sigs(target[take], sigs, has)
            start += n
    for w in (nodes_w, sigs_w, bands_w):
        w.close()
    return {"signatures_computed": computed if cfg.near else 0, "signatures_reused": reused, "index_size": index.size}


def _global_step(
    con: duckdb.DuckDBPyConnection,
    work: Path,
    cfg: DedupConfig,
    input_files: list[Path],
    progress: bool,
) -> tuple[dict[int, tuple[str | None, str, int | None]], dict[str, int]]:
    """Exact groups, LSH candidates, verification and components, in DuckDB.

    Nodes are numbered by source URI, and every cluster keeps its smallest
    node: the document with the smallest source URI. The decisions are thus a
    function of the current set of documents alone, whatever order an
    incremental ingest wrote them in.
    Returns, for every input row that is dropped or belongs to a cluster,
    `(reason or None, detail, cluster id)`.
    """
    nodes, bands_f = (str(work / f) for f in ("nodes.parquet", "bands.parquet"))
    con.execute(
        f"CREATE TABLE nodes AS SELECT row, id, text_hash, row_number() OVER (ORDER BY source, row) - 1 AS node "
        f"FROM '{nodes}'"
    )
    # Exact duplicates: the smallest node of each content hash represents it.
    if cfg.exact:
        con.execute("CREATE TABLE rep AS SELECT node, min(node) OVER (PARTITION BY text_hash) AS rep FROM nodes")
    else:
        con.execute("CREATE TABLE rep AS SELECT node, node AS rep FROM nodes")
    stats: dict[str, int] = {"candidate_pairs": 0, "verified_pairs": 0}
    con.execute("CREATE TABLE edges (a BIGINT, b BIGINT, jaccard DOUBLE)")
    if cfg.near and pq.ParquetFile(bands_f).metadata.num_rows:
        m = cfg.max_bucket_pairs
        con.execute(
            f"CREATE TABLE b AS SELECT band, key, n.node FROM '{bands_f}' JOIN nodes n USING (row) "
            "WHERE n.node IN (SELECT node FROM rep WHERE rep = node)"
        )
        con.execute(
            "CREATE TABLE buckets AS SELECT band, key, count(*) AS n, min(node) AS root FROM b "
            "GROUP BY band, key HAVING count(*) > 1"
        )
        con.execute(
            f"""CREATE TABLE pairs AS
            SELECT DISTINCT a, b FROM (
                SELECT x.node AS a, y.node AS b FROM b x JOIN b y USING (band, key)
                JOIN buckets k USING (band, key) WHERE k.n <= {m} AND x.node < y.node
                UNION ALL
                SELECT k.root AS a, x.node AS b FROM b x JOIN buckets k USING (band, key)
                WHERE k.n > {m} AND x.node <> k.root
            )"""
        )
        stats["candidate_pairs"] = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        if cfg.verify_jaccard and stats["candidate_pairs"]:
            _verify(con, cfg, input_files, progress)
        else:
            con.execute("INSERT INTO edges SELECT a, b, NULL FROM pairs")
        stats["verified_pairs"] = con.execute("SELECT count(*) FROM edges").fetchone()[0]
    # Connected components by min-label propagation with pointer jumping.
    con.execute("CREATE TABLE e AS SELECT a, b FROM edges UNION SELECT b, a FROM edges")
    con.execute("CREATE TABLE lab AS SELECT a AS node, least(a, min(b)) AS c FROM e GROUP BY a")
    for _ in range(200):
        con.execute(
            """CREATE OR REPLACE TABLE lab2 AS
            SELECT l.node, least(l.c, min(n.c)) AS c FROM lab l JOIN e ON e.a = l.node JOIN lab n ON n.node = e.b
            GROUP BY l.node, l.c"""
        )
        con.execute("CREATE OR REPLACE TABLE lab2 AS SELECT x.node, least(x.c, y.c) AS c FROM lab2 x JOIN lab2 y ON y.node = x.c")
        changed = con.execute("SELECT count(*) FROM lab JOIN lab2 USING (node) WHERE lab.c <> lab2.c").fetchone()[0]
        con.execute("CREATE OR REPLACE TABLE lab AS SELECT * FROM lab2")
        if not changed:
            break
    # Final representative of each node: its exact representative's component root.
    con.execute(
        """CREATE TABLE final AS
        SELECT r.node, coalesce(l.c, r.rep) AS root, r.rep <> r.node AS exact_dup
        FROM rep r LEFT JOIN lab l ON l.node = r.rep"""
    )
    con.execute("CREATE TABLE sizes AS SELECT root, count(*) AS n FROM final GROUP BY root")
    stats["clusters"] = con.execute("SELECT count(*) FROM sizes WHERE n > 1").fetchone()[0]
    result = con.execute(
        """SELECT n.row, f.node, f.root, f.exact_dup, rn.id AS root_id, j.jaccard
        FROM final f
        JOIN nodes n ON n.node = f.node
        JOIN sizes s ON s.root = f.root
        JOIN nodes rn ON rn.node = f.root
        LEFT JOIN (SELECT a, b, max(jaccard) AS jaccard FROM edges GROUP BY a, b) j
               ON (j.a = least(f.node, f.root) AND j.b = greatest(f.node, f.root))
        WHERE s.n > 1"""
    ).fetchall()
    decisions: dict[int, tuple[str | None, str, int | None]] = {}
    for row, node, root, exact_dup, root_id, jac in result:
        cid = cluster_id(root_id)
        if node == root:
            decisions[row] = (None, "", cid)
        elif exact_dup:
            decisions[row] = ("exact_duplicate", f"kept={root_id}", cid)
        else:
            detail = f"kept={root_id}" + (f" jaccard={jac:.3f}" if jac is not None else "")
            decisions[row] = ("near_duplicate", detail, cid)
    return decisions, stats


def _verify(con: duckdb.DuckDBPyConnection, cfg: DedupConfig, input_files: list[Path], progress: bool) -> None:
    """Keep only candidate pairs whose exact Jaccard similarity of shingle sets reaches the threshold."""
    con.execute(
        "CREATE TABLE pair_rows AS SELECT p.a, p.b, na.row AS ra, nb.row AS rb FROM pairs p "
        "JOIN nodes na ON na.node = p.a JOIN nodes nb ON nb.node = p.b"
    )
    wanted = [r for (r,) in con.execute("SELECT ra FROM pair_rows UNION SELECT rb FROM pair_rows ORDER BY 1").fetchall()]
    shingles: dict[int, np.ndarray] = {}
    row0 = 0
    pos = 0
    for batch in tqdm(
        iter_batches(input_files, columns=["text"], batch_size=cfg.batch_size),
        desc="dedup: verify", unit="batch", disable=not progress,
    ):
        n = batch.num_rows
        end = int(np.searchsorted(wanted, row0 + n))
        take = np.array(wanted[pos:end], dtype=np.int64) - row0
        if len(take):
            words = normalize_words(batch.column("text").take(pa.array(take)), cfg.normalize)
            h, o = shingle_hashes(words, cfg.shingle_size)
            for k, r in enumerate(take):
                shingles[row0 + int(r)] = np.unique(h[o[k] : o[k + 1]])
        pos = end
        row0 += n
    pairs = con.execute("SELECT a, b, ra, rb FROM pair_rows").fetchnumpy()
    a_nodes, b_nodes = pairs["a"], pairs["b"]
    jac = np.array(
        [exact_jaccard(shingles[a], shingles[b]) for a, b in zip(pairs["ra"].tolist(), pairs["rb"].tolist(), strict=True)],
        dtype=np.float64,
    )
    keep = jac >= cfg.threshold
    edges = pa.table({"a": a_nodes[keep], "b": b_nodes[keep], "jaccard": jac[keep]})
    con.register("verified", edges)
    con.execute("INSERT INTO edges SELECT a, b, jaccard FROM verified")
    con.unregister("verified")


def _write_outputs(
    input_files: list[Path],
    stage_dir: Path,
    decisions: dict[int, tuple[str | None, str, int | None]],
    cfg: DedupConfig,
    progress: bool,
) -> tuple[list, int, dict[str, int]]:
    """Second pass over the input: kept documents with `minhash_cluster`, and `dropped.parquet`."""
    previous_parts = set(document_files(stage_dir))
    parts = PartWriter(stage_dir)
    dropped_w = ParquetWriter(stage_dir / DROPPED, DROPPED_SCHEMA)
    dropped: dict[str, int] = {"exact_duplicate": 0, "near_duplicate": 0}
    row0 = 0
    bar = tqdm(total=count_rows(input_files), desc="dedup: write", unit="doc", disable=not progress)
    for batch in iter_batches(input_files, batch_size=ROW_GROUP_SIZE):
        table = pa.Table.from_batches([batch])
        if "minhash_cluster" in table.column_names:
            table = table.drop_columns(["minhash_cluster"])
        n = table.num_rows
        keep = np.ones(n, bool)
        cluster: list[int | None] = [None] * n
        d_ids, d_src, d_reason, d_detail = [], [], [], []
        ids = table.column("id")
        sources = table.column("source")
        for r in range(row0, row0 + n):
            dec = decisions.get(r)
            if dec is None:
                continue
            reason, detail, cid = dec
            i = r - row0
            cluster[i] = cid
            if reason is not None:
                keep[i] = False
                d_ids.append(ids[i].as_py())
                d_src.append(sources[i].as_py())
                d_reason.append(reason)
                d_detail.append(detail)
                dropped[reason] += 1
        table = table.append_column("minhash_cluster", pa.array(cluster, pa.int64()))
        parts.write(table.filter(pa.array(keep)))
        if d_ids:
            dropped_w.write(dropped_rows(d_ids, d_src, STAGE, d_reason, d_detail))
        row0 += n
        bar.update(n)
    bar.close()
    outputs = list(parts.close())
    kept = sum(o.rows for o in outputs)
    outputs.append(dropped_w.close(stage_dir))
    for stale in previous_parts - {stage_dir / o.path for o in outputs}:
        stale.unlink(missing_ok=True)  # parts of an earlier, larger run
    return outputs, kept, dropped


def _write_index(con: duckdb.DuckDBPyConnection, work: Path, stage_dir: Path, cfg: DedupConfig) -> list:
    """`signatures.parquet`: the signature of every document of this run's input, in input order.

    Documents gone from the input leave the cache with it. The rows stream from
    DuckDB into `ParquetWriter`, whose row groups depend on the rows alone, so a
    resumed run rewrites it byte for byte; its checksum goes beside it.
    """
    if not cfg.near:
        return []
    schema = pa.schema(
        [("id", pa.string()), ("text_hash", pa.binary()), ("signature", pa.list_(pa.uint32(), cfg.num_perm))]
    )
    target = stage_dir / SIGNATURES
    result = con.sql(
        f"SELECT n.id, n.text_hash, s.signature FROM '{work / 'sigs.parquet'}' s "
        "JOIN nodes n ON n.row = s.row ORDER BY s.row"
    )
    with ParquetWriter(target, schema) as writer:
        for batch in result.to_arrow_reader(ROW_GROUP_SIZE):
            writer.write(batch)
    atomic_write_json(stage_dir / SIGNATURES_KEY, {"settings": cfg.signature_key(), "sha256": file_sha256(target)})
    rows = pq.ParquetFile(target).metadata.num_rows
    return [describe_file(stage_dir, target, rows), describe_file(stage_dir, stage_dir / SIGNATURES_KEY)]
