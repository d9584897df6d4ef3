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

Memory is bounded: what grows with the corpus lives in DuckDB (a database file
in the work directory, `memory_limit` and a spill directory), in Parquet work
files written and read a batch at a time, or in fixed-width numpy arrays of a
few bytes per document (the cache index, rows of candidate pairs, the edges
of the union-find); no per-document Python object outlives its batch.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from refinery.storage.atomic import atomic_path, atomic_write_json
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
from refinery.tasks.minhash import MinHasher, band_hashes, optimal_bands, rensa_signatures, shingle_hashes
from refinery.tasks.normalize import NormalizeConfig, join_words, normalize_words, text_hashes
from refinery.tasks.parallel import map_in_order

STAGE = "dedup"
SIGNATURES = "signatures.parquet"
SIGNATURES_KEY = "signatures.json"
DROPPED = "dropped.parquet"
WORK = ".work"
_PAIR_CHUNK = 16_384  # candidate pairs verified per numpy step


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
    minhash_backend: Literal["numpy", "rensa"] = Field(
        "numpy", description="numpy: bit-identical to datasketch; rensa: rensa's R-MinHash (Rust, optional package)"
    )

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
            "scheme": "datasketch-affine32" if self.minhash_backend == "numpy" else "rensa-rminhash-2",
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
    if cfg.minhash_backend == "rensa":
        sigs = rensa_signatures(shingles, offsets, cfg.num_perm, cfg.seed)
    else:
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

    In memory it is fixed-width numpy, 28 bytes an entry rather than a dict of
    Python strings: the 64-bit hash of each id (sorted), the 16-byte content
    hash and the entry's row in the file. Ids are matched by hash and then by
    content hash, so a colliding id can only ever lend the signature of the very
    same content, which is the same signature.
    """

    def __init__(self, stage_dir: Path, cfg: DedupConfig) -> None:
        self.path = stage_dir / SIGNATURES
        self.keys = np.empty(0, np.uint64)
        self.text_hashes = np.empty((0, 2), np.uint64)
        self.entries = np.empty(0, np.int64)
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
        keys, hashes = [], []
        for batch in _stream(self.path, ["id", "text_hash"]):
            keys.append(id_keys(batch.column("id")))
            hashes.append(_hash_matrix(batch.column("text_hash")))
        self.size = sum(len(k) for k in keys)
        if not self.size:
            return
        keys_all = np.concatenate(keys)
        order = np.argsort(keys_all, kind="stable")  # equal keys keep file order: the last one wins, as a dict would
        self.keys = keys_all[order]
        self.text_hashes = np.concatenate(hashes)[order]
        self.entries = order.astype(np.int64 if self.size >= 2**31 else np.int32)

    def lookup(self, ids: pa.Array) -> tuple[np.ndarray, list[bytes | None]]:
        """For each id: the cache entry holding it (-1 if none) and that entry's content hash (None if none)."""
        n = len(ids)
        if not self.size or n == 0:
            return np.full(n, -1, np.int64), [None] * n
        keys = id_keys(ids)
        pos = np.searchsorted(self.keys, keys, side="right") - 1
        pos_ok = np.maximum(pos, 0)
        found = (pos >= 0) & (self.keys[pos_ok] == keys)
        entry = np.where(found, self.entries[pos_ok], -1).astype(np.int64)
        known: list[bytes | None] = [None] * n
        for i in np.flatnonzero(found):
            known[i] = self.text_hashes[pos_ok[i]].tobytes()
        return entry, known


def id_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of document ids (DuckDB's `hash`, consistent within a process)."""
    con = duckdb.connect()
    try:
        id_table = pa.table({"id": ids})  # noqa: F841 - read by name in the query
        out = con.execute("SELECT hash(id) AS h FROM id_table").fetchnumpy()["h"]
    finally:
        con.close()
    return np.asarray(out, dtype=np.uint64)


def _hash_matrix(hashes: pa.Array | pa.ChunkedArray | list[bytes]) -> np.ndarray:
    """16-byte content hashes as an `(n, 2)` uint64 array."""
    if not isinstance(hashes, list):
        hashes = hashes.to_pylist()
    return np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(-1, 2).copy()


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
        con = _connect(work, cfg)
        global_stats = _global_step(con, work, cfg, input_files, progress)
        t_global = time.perf_counter()
        _export(con, "SELECT * FROM decisions ORDER BY row", work / "decisions.parquet")
        con.close()  # the output passes below need none of DuckDB's memory
        pa.default_memory_pool().release_unused()
        decisions = _stream(work / "decisions.parquet")
        outputs, kept, dropped = _write_outputs(input_files, stage_dir, decisions, progress)
        outputs += _write_index(work, stage_dir, cfg, in_order=stats["signatures_reused"] == 0)
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


class _Scratch:
    """A work file of the global step: no dictionary pages and light compression.

    Its columns are mostly random hashes, on which Parquet's dictionary encoding
    is wasted work; it lives only as long as the run.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self._ctx = atomic_path(path)  # written under a temporary name, renamed when complete
        self._writer = pq.ParquetWriter(self._ctx.__enter__(), schema, compression="lz4", use_dictionary=False)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema))

    def close(self) -> None:
        self._writer.close()
        self._ctx.__exit__(None, None, None)


def _stream(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one Parquet file without pre-buffering.

    With Arrow's pre-buffering a reader keeps every range it has read until it
    is closed: reading a file of gigabytes (signatures at ten million documents)
    would hold all of it in memory.
    """
    pf = pq.ParquetFile(path, pre_buffer=False)
    try:
        yield from pf.iter_batches(batch_size=ROW_GROUP_SIZE, columns=columns)
    finally:
        pf.close()


def _signature_matrix(column: pa.Array | pa.ChunkedArray, num_perm: int) -> pa.FixedSizeListArray:
    """Signatures stored as fixed-size binary values (work files) as `num_perm` uint32 lists (the cache)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = 4 * num_perm
    if pa.types.is_fixed_size_binary(column.type):
        data = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * width : (column.offset + len(column)) * width]
    else:  # BLOB from DuckDB: every value is `width` bytes, so the values are contiguous
        column = column.cast(pa.large_binary())
        offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + len(column) + 1]
        data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    if len(data) != width * len(column):
        raise ValueError(f"signatures of {len(data)} bytes for {len(column)} rows of {width} bytes")
    return pa.FixedSizeListArray.from_arrays(pa.array(data.view(np.uint32), pa.uint32()), num_perm)


def _connect(work: Path, cfg: DedupConfig, name: str = "global.duckdb") -> duckdb.DuckDBPyConnection:
    """A DuckDB database file in the work directory: its tables and sorts spill to disk past `memory_limit`."""
    con = duckdb.connect(str(work / name))
    con.execute(f"SET memory_limit = '{cfg.duckdb_memory_limit}'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")  # every order that matters is an ORDER BY
    return con


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
    sig_type = pa.binary(4 * cfg.num_perm)  # a signature's uint32 values as one fixed-size value: fast to write
    sig_schema = pa.schema([("row", pa.int64()), ("signature", sig_type)])
    band_schema = pa.schema([("row", pa.int64()), ("band", pa.int16()), ("key", pa.int64())])
    nodes_w = _Scratch(work / "nodes.parquet", node_schema)
    sigs_w = _Scratch(work / "sigs.parquet", sig_schema)
    bands_w = _Scratch(work / "bands.parquet", band_schema)
    computed = 0

    def write_sigs(row: np.ndarray, sigs: np.ndarray, has: np.ndarray) -> None:
        if not cfg.near or len(row) == 0:
            return
        blob = pa.py_buffer(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())
        sigs_w.write(pa.table({"row": row, "signature": pa.FixedSizeBinaryArray.from_buffers(sig_type, len(row),
                                                                                              [None, blob])},
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

    # (input row, cache entry) of every document that reuses a cached signature: 16 bytes each.
    reuse_rows: list[np.ndarray] = []
    reuse_entries: list[np.ndarray] = []

    def batches() -> Iterator[tuple[Any, ...]]:
        for batch in iter_batches(input_files, columns=["id", "text"], batch_size=cfg.batch_size):
            entry, known = index.lookup(batch.column("id"))
            entries.append(entry)
            yield (batch.column("text"), known, cfg)

    entries: collections.deque[np.ndarray] = collections.deque()  # cache entries of batches handed out
    row0 = 0
    bar = tqdm(total=n_in, desc="dedup: signatures", unit="doc", disable=not progress)
    id_batches = iter_batches(input_files, columns=["id", "source"], batch_size=cfg.batch_size)
    for (hashes, comp_rows, sigs, has), id_batch in zip(map_in_order(signature_batch, batches(), executor), id_batches, strict=True):
        entry = entries.popleft()
        n = id_batch.num_rows
        row = row0 + np.arange(n, dtype=np.int64)
        computed_mask = np.zeros(n, bool)
        computed_mask[comp_rows] = True
        cached = np.flatnonzero(~computed_mask)
        if len(cached):
            reuse_rows.append(row[cached])
            reuse_entries.append(entry[cached])
        nodes_w.write(
            pa.table({"row": row, "id": id_batch.column("id"), "source": id_batch.column("source"), "text_hash": hashes},
                     schema=node_schema)
        )
        write_sigs(row[comp_rows], sigs, has)
        computed += len(comp_rows)
        row0 += n
        bar.update(n)
    bar.close()
    reused = sum(len(r) for r in reuse_rows)
    if reused and cfg.near:
        r_rows, r_entries = np.concatenate(reuse_rows), np.concatenate(reuse_entries)
        order = np.argsort(r_entries, kind="stable")
        r_rows, r_entries = r_rows[order], r_entries[order]
        start = 0
        for batch in _stream(index.path, ["signature"]):
            n = batch.num_rows
            lo, hi = np.searchsorted(r_entries, [start, start + n])
            if hi > lo:
                sigs = batch.column("signature").flatten().to_numpy().reshape(n, cfg.num_perm)[r_entries[lo:hi] - start]
                has = ~(sigs == np.uint32(0xFFFFFFFF)).all(axis=1)
                write_sigs(r_rows[lo:hi], sigs, has)
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
) -> dict[str, int]:
    """Exact groups, LSH candidates, verification and components, in DuckDB.

    Nodes are numbered by source URI, and every cluster keeps its smallest
    node: the document with the smallest source URI. The decisions are thus a
    function of the current set of documents alone, whatever order an
    incremental ingest wrote them in.
    Leaves table `decisions`: every input row that belongs to a cluster, with
    whether it survives, whether it is an exact duplicate, the id of its
    cluster's survivor and the Jaccard similarity to it when verified.
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
            _verify(con, cfg, input_files, work, progress)
        else:
            con.execute("INSERT INTO edges SELECT a, b, NULL FROM pairs")
        stats["verified_pairs"] = con.execute("SELECT count(*) FROM edges").fetchone()[0]
    _components(con)
    # Final representative of each node: its exact representative's component root.
    con.execute(
        """CREATE TABLE final AS
        SELECT r.node, coalesce(l.c, r.rep) AS root, r.rep <> r.node AS exact_dup
        FROM rep r LEFT JOIN lab l ON l.node = r.rep"""
    )
    con.execute("CREATE TABLE sizes AS SELECT root, count(*) AS n FROM final GROUP BY root")
    stats["clusters"] = con.execute("SELECT count(*) FROM sizes WHERE n > 1").fetchone()[0]
    con.execute(
        """CREATE TABLE decisions AS
        SELECT n.row, f.node = f.root AS survivor, f.exact_dup, rn.id AS root_id, j.jaccard
        FROM final f
        JOIN nodes n ON n.node = f.node
        JOIN sizes s ON s.root = f.root
        JOIN nodes rn ON rn.node = f.root
        LEFT JOIN (SELECT a, b, max(jaccard) AS jaccard FROM edges GROUP BY a, b) j
               ON (j.a = least(f.node, f.root) AND j.b = greatest(f.node, f.root))
        WHERE s.n > 1"""
    )
    return stats


def min_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on nodes `0..n-1` with edges `(a[i], b[i])`: each node's smallest node.

    Numpy union-find over int arrays (hook each root to the smaller root across an
    edge, then jump pointers until every node points at its root): memory is a
    few int64 per node and edge, and the loop ends because roots only decrease.
    """
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            break
        a, b, ra, rb = a[split], b[split], ra[split], rb[split]  # edges inside one tree stay inside it
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _components(con: duckdb.DuckDBPyConnection) -> None:
    """Table `lab(node, c)`: for every node with an edge, the smallest node of its connected component.

    The edges (near duplicates, a small share of the corpus) come to numpy as
    int64 arrays; nodes without edges never leave DuckDB.
    """
    edges = con.execute("SELECT a, b FROM edges").fetchnumpy()
    a, b = np.asarray(edges["a"], np.int64), np.asarray(edges["b"], np.int64)
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    labels = min_labels(len(nodes), inverse[: len(a)], inverse[len(a) :])
    lab = pa.table({"node": pa.array(nodes, pa.int64()), "c": pa.array(nodes[labels], pa.int64())})
    con.register("lab_arrow", lab)
    con.execute("CREATE TABLE lab AS SELECT node, c FROM lab_arrow")
    con.unregister("lab_arrow")


def _verify(con: duckdb.DuckDBPyConnection, cfg: DedupConfig, input_files: list[Path], work: Path,
            progress: bool) -> None:
    """Keep only candidate pairs whose exact Jaccard similarity of shingle sets reaches the threshold.

    The distinct shingle sets of documents in a candidate pair go to a Parquet
    work file (one pass over the input); DuckDB joins them to the pairs and
    streams them back in chunks, whose intersections numpy counts by sorting.
    Memory: 8 bytes per document in a pair, plus one chunk.
    """
    con.execute(
        "CREATE TABLE pair_rows AS SELECT p.a, p.b, na.row AS ra, nb.row AS rb FROM pairs p "
        "JOIN nodes na ON na.node = p.a JOIN nodes nb ON nb.node = p.b"
    )
    wanted = con.execute(
        "SELECT r FROM (SELECT ra AS r FROM pair_rows UNION SELECT rb FROM pair_rows) ORDER BY r"
    ).fetchnumpy()["r"]
    wanted = np.asarray(wanted, np.int64)
    sets_schema = pa.schema([("row", pa.int64()), ("shingles", pa.list_(pa.uint32()))])
    sets_w = _Scratch(work / "shingle_sets.parquet", sets_schema)
    row0 = 0
    for batch in tqdm(
        iter_batches(input_files, columns=["text"], batch_size=cfg.batch_size),
        desc="dedup: verify", unit="batch", disable=not progress,
    ):
        n = batch.num_rows
        lo, hi = np.searchsorted(wanted, [row0, row0 + n])
        if hi > lo:
            take = wanted[lo:hi] - row0
            words = normalize_words(batch.column("text").take(pa.array(take)), cfg.normalize)
            values, offsets = _distinct_per_list(*shingle_hashes(words, cfg.shingle_size))
            sets_w.write(pa.table({"row": wanted[lo:hi],
                                   "shingles": pa.ListArray.from_arrays(pa.array(offsets, pa.int64()).cast(pa.int32()),
                                                                        pa.array(values, pa.uint32()))},
                                  schema=sets_schema))
        row0 += n
    sets_w.close()
    verified_w = _Scratch(work / "verified.parquet",
                          pa.schema([("a", pa.int64()), ("b", pa.int64()), ("jaccard", pa.float64())]))
    sets = str(work / "shingle_sets.parquet")
    reader = con.sql(
        f"SELECT p.a, p.b, sa.shingles AS sa, sb.shingles AS sb FROM pair_rows p "
        f"JOIN '{sets}' sa ON sa.row = p.ra JOIN '{sets}' sb ON sb.row = p.rb"
    ).to_arrow_reader(_PAIR_CHUNK)
    for chunk in reader:
        jac = _set_jaccard(chunk.column("sa"), chunk.column("sb"))
        keep = jac >= cfg.threshold
        if keep.any():
            verified_w.write(pa.table({"a": chunk.column("a").to_numpy()[keep], "b": chunk.column("b").to_numpy()[keep],
                                       "jaccard": jac[keep]}))
    verified_w.close()
    con.execute(f"INSERT INTO edges SELECT a, b, jaccard FROM '{work / 'verified.parquet'}'")


def _distinct_per_list(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of each list `values[offsets[i]:offsets[i + 1]]` (uint32), as new (values, offsets)."""
    n = len(offsets) - 1
    owner = np.repeat(np.arange(n, dtype=np.uint64), np.diff(offsets))
    keys = np.unique((owner << np.uint64(32)) | values.astype(np.uint64))
    counts = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=n)
    new_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), new_offsets


def _set_jaccard(a: pa.ListArray, b: pa.ListArray) -> np.ndarray:
    """Row-wise Jaccard similarity of two columns of distinct-value lists (what `exact_jaccard` gives, batched)."""
    def parts(col: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy()[offsets[0] : offsets[-1]]
        return values, np.diff(offsets)

    va, la = parts(a)
    vb, lb = parts(b)
    m = len(la)
    pair = np.concatenate([np.repeat(np.arange(m, dtype=np.uint64), la), np.repeat(np.arange(m, dtype=np.uint64), lb)])
    keys = np.sort((pair << np.uint64(32)) | np.concatenate([va, vb]).astype(np.uint64))
    shared = keys[1:][keys[1:] == keys[:-1]]  # each list is distinct: a repeat is a value in both
    inter = np.bincount((shared >> np.uint64(32)).astype(np.int64), minlength=m)
    union = la + lb - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _write_outputs(
    input_files: list[Path],
    stage_dir: Path,
    decisions: Iterator[pa.RecordBatch],
    progress: bool,
) -> tuple[list, int, dict[str, int]]:
    """Second pass over the input: kept documents with `minhash_cluster`, and `dropped.parquet`.

    `decisions` streams in input-row order beside the input, so memory is one
    batch of each.
    """
    previous_parts = set(document_files(stage_dir))
    parts = PartWriter(stage_dir)
    dropped_w = ParquetWriter(stage_dir / DROPPED, DROPPED_SCHEMA)
    dropped: dict[str, int] = {"exact_duplicate": 0, "near_duplicate": 0}
    pending = _RowStream(decisions)
    row0 = 0
    bar = tqdm(total=count_rows(input_files), desc="dedup: write", unit="doc", disable=not progress)
    for batch in iter_batches(input_files, batch_size=ROW_GROUP_SIZE):
        table = pa.Table.from_batches([batch])
        if "minhash_cluster" in table.column_names:
            table = table.drop_columns(["minhash_cluster"])
        n = table.num_rows
        keep = np.ones(n, bool)
        cluster = np.zeros(n, np.int64)
        in_cluster = np.zeros(n, bool)
        dec = pending.until(row0 + n)
        if dec is not None and dec.num_rows:
            pos = dec.column("row").to_numpy() - row0
            root_ids = dec.column("root_id").to_pylist()
            cids = {r: cluster_id(r) for r in set(root_ids)}
            cluster[pos] = [cids[r] for r in root_ids]
            in_cluster[pos] = True
            survivor = dec.column("survivor").to_numpy(zero_copy_only=False)
            exact = dec.column("exact_dup").to_numpy(zero_copy_only=False)
            jaccard = dec.column("jaccard").to_pylist()
            gone = np.flatnonzero(~survivor)
            if len(gone):
                keep[pos[gone]] = False
                reasons = ["exact_duplicate" if exact[k] else "near_duplicate" for k in gone]
                details = [
                    f"kept={root_ids[k]}" + ("" if exact[k] or jaccard[k] is None else f" jaccard={jaccard[k]:.3f}")
                    for k in gone
                ]
                for r in reasons:
                    dropped[r] += 1
                take = pa.array(pos[gone])
                dropped_w.write(dropped_rows(table.column("id").take(take).to_pylist(),
                                             table.column("source").take(take).to_pylist(),
                                             STAGE, reasons, details))
        table = table.append_column("minhash_cluster", pa.array(cluster, pa.int64(), mask=~in_cluster))
        parts.write(table.filter(pa.array(keep)))
        row0 += n
        bar.update(n)
    bar.close()
    outputs = list(parts.close())
    kept = sum(o.rows for o in outputs)
    outputs.append(dropped_w.close(stage_dir))
    for stale in previous_parts - {stage_dir / o.path for o in outputs}:
        stale.unlink(missing_ok=True)  # parts of an earlier, larger run
    return outputs, kept, dropped


class _RowStream:
    """Hands out the rows of a stream sorted by `row` up to a given row, a batch at a time."""

    def __init__(self, reader: Iterator[pa.RecordBatch]) -> None:
        self._reader = iter(reader)
        self._buffer: pa.Table | None = None
        self._done = False

    def until(self, end: int) -> pa.Table | None:
        """The next rows whose `row` is below `end`."""
        out: list[pa.Table] = []
        while True:
            if self._buffer is None or self._buffer.num_rows == 0:
                batch = None if self._done else next(self._reader, None)
                if batch is None:
                    self._done = True
                    break
                self._buffer = pa.Table.from_batches([batch])
            k = int(np.searchsorted(self._buffer.column("row").to_numpy(), end))
            out.append(self._buffer.slice(0, k))
            self._buffer = self._buffer.slice(k)
            if self._buffer.num_rows:
                break
        return pa.concat_tables(out) if out else None


def _export(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    """Stream a query's rows, in its order, into a work file."""
    reader = con.sql(query).to_arrow_reader(ROW_GROUP_SIZE)
    writer = _Scratch(path, reader.schema)
    for batch in reader:
        writer.write(pa.Table.from_batches([batch]))
    writer.close()


def _write_index(work: Path, stage_dir: Path, cfg: DedupConfig, in_order: bool) -> list:
    """`signatures.parquet`: the signature of every document of this run's input, in input order.

    Documents gone from the input leave the cache with it. When every signature
    was computed in this run (`in_order`), the work files already hold one row
    per input row in order and are zipped batch by batch; otherwise DuckDB
    sorts them by row (spilling at scale). Either way the rows go to
    `ParquetWriter`, whose row groups depend on the rows alone, so a resumed
    run rewrites it byte for byte; its checksum goes beside it.
    """
    if not cfg.near:
        return []
    schema = pa.schema(
        [("id", pa.string()), ("text_hash", pa.binary()), ("signature", pa.list_(pa.uint32(), cfg.num_perm))]
    )
    target = stage_dir / SIGNATURES
    with ParquetWriter(target, schema) as writer:
        if in_order:
            signatures = _Rows(_stream(work / "sigs.parquet", ["signature"]))
            for batch in _stream(work / "nodes.parquet", ["id", "text_hash"]):
                if batch.num_rows == 0:
                    continue
                sig = _signature_matrix(signatures.take(batch.num_rows).column("signature"), cfg.num_perm)
                writer.write(pa.table({"id": batch.column("id"), "text_hash": batch.column("text_hash"),
                                       "signature": sig}, schema=schema))
        else:
            con = _connect(work, cfg, "index.duckdb")
            result = con.sql(
                f"SELECT n.id, n.text_hash, s.signature FROM '{work / 'sigs.parquet'}' s "
                f"JOIN '{work / 'nodes.parquet'}' n ON n.row = s.row ORDER BY s.row"
            )
            for batch in result.to_arrow_reader(ROW_GROUP_SIZE):
                writer.write(pa.table({"id": batch.column("id"), "text_hash": batch.column("text_hash"),
                                       "signature": _signature_matrix(batch.column("signature"), cfg.num_perm)},
                                      schema=schema))
            con.close()
    atomic_write_json(stage_dir / SIGNATURES_KEY, {"settings": cfg.signature_key(), "sha256": file_sha256(target)})
    rows = pq.ParquetFile(target).metadata.num_rows
    return [describe_file(stage_dir, target, rows), describe_file(stage_dir, stage_dir / SIGNATURES_KEY)]


class _Rows:
    """Re-cuts a stream of record batches into tables of the sizes asked for."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self._buffer: pa.Table | None = None

    def take(self, n: int) -> pa.Table:
        parts: list[pa.Table] = []
        while n > 0:
            if self._buffer is None or self._buffer.num_rows == 0:
                self._buffer = pa.Table.from_batches([next(self._batches)])
            part = self._buffer.slice(0, n)
            self._buffer = self._buffer.slice(part.num_rows)
            parts.append(part)
            n -= part.num_rows
        return pa.concat_tables(parts).combine_chunks()
