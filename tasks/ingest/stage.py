"""The ingest stage: list the sources, parse what is new or changed, write the documents table.

Outputs in the stage directory, always describing the full current state of the sources:
- `part-NNNNN.parquet`: documents (DOCUMENT_SCHEMA);
- `quarantine.parquet`: every raw record that could not be read (`source`, `reason`, `error`);
- `files.parquet`: the file index (URI, size, mtime, sha256, records, status) that makes the
  next run incremental: files with the same content hash are carried over without parsing,
  new and changed files are parsed, removed files' documents disappear.

Parsing is a pure function of a batch of files (`parse_batch`), mapped through an
executor when one is given (a Dask `client.get_executor()`, a process pool) so results
are identical however it runs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from refinery import __version__
from refinery.storage.atomic import sweep_temporaries
from refinery.storage.documents import (
    DOCUMENT_SCHEMA,
    QUARANTINE_SCHEMA,
    ParquetWriter,
    PartWriter,
    document_files,
    iter_batches,
)
from refinery.storage.manifest import MANIFEST_NAME, Counts, StageResult, stable_hash
from refinery.tasks.ingest.base import Context, Doc, Problem
from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.formats import detect, read_blob
from refinery.tasks.ingest.sources import SourceFile, list_sources, open_source
from refinery.tasks.ingest.watchdog import parse_guarded
from refinery.tasks.parallel import map_in_order

STAGE = "ingest"
QUARANTINE_FILE = "quarantine.parquet"
INDEX_FILE = "files.parquet"
PREVIOUS_DIR = ".previous"
ROWS_PER_PART = 200_000

INDEX_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("rel", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("records", pa.int64()),
        pa.field("docs", pa.int64()),
        pa.field("quarantined", pa.int64()),
        pa.field("status", pa.string()),  # ok | partial | quarantined | error
    ]
)
_CONFIG_KEY = b"refinery.ingest.parse_config"


def parse_config_hash(cfg: IngestConfig) -> str:
    """Hash of the settings that change what a file parses into (not which files or how fast)."""
    keys = cfg.model_dump(mode="json", exclude={"include", "exclude", "workers", "batch_files", "batch_bytes"})
    return stable_hash({"config": keys, "code": __version__})


def doc_id(source: str) -> str:
    """Stable 32-hex id of a record: a hash of its source URI, which includes its position."""
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def file_of(source: str, files: set[str] | dict[str, Any]) -> str:
    """The file URI a document or quarantine source (`uri` or `uri#n`) came from."""
    if source in files:
        return source
    cut = source.rfind("#")
    return source[:cut] if cut > 0 else source


# -- parsing one batch (pure, runs anywhere) ---------------------------------------------------


@dataclass
class BatchResult:
    docs: pa.Table
    quarantine: list[dict[str, str]] = field(default_factory=list)
    index: list[dict[str, Any]] = field(default_factory=list)
    bytes_read: int = 0


def _clean(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates from a parser: Parquet needs valid UTF-8
        return text.encode("utf-8", "replace").decode("utf-8")


def parse_file(sf: SourceFile, cfg: IngestConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """Documents, quarantine rows and the index row of one file. Never raises for bad input."""
    index = {"source": sf.uri, "rel": sf.rel, "size": sf.size, "mtime_ns": sf.mtime_ns, "sha256": None,
             "kind": detect(sf.rel)}
    items: list[Doc | Problem] = []
    data = b""
    if sf.error:
        items.append(Problem(*sf.error))
    elif sf.size > cfg.max_file_bytes:
        items.append(Problem("too_large", f"{sf.size} bytes is over max_file_bytes={cfg.max_file_bytes}"))
    else:
        try:
            with open_source(sf) as f:
                data = f.read(cfg.max_file_bytes + 1)
        except OSError as exc:
            items.append(Problem("unreadable", f"{exc.strerror or exc}; check the file's permissions"))
        else:
            index["sha256"] = hashlib.sha256(data).hexdigest()
            index["kind"] = detect(sf.rel, data)  # a format may claim a file by its content
            index["size"] = len(data) if sf.size < 0 else sf.size
            if len(data) > cfg.max_file_bytes:
                items.append(Problem("too_large", f"over max_file_bytes={cfg.max_file_bytes}"))
            else:
                items = _parse_items(sf, data, cfg)
    docs, quarantine = [], []
    for item in items:
        source = sf.uri if item.pos is None else f"{sf.uri}#{item.pos}"
        if isinstance(item, Doc):
            docs.append({"id": doc_id(source), "text": _clean(item.text), "source": source, "format": item.format,
                         "bytes": item.nbytes,
                         "meta": json.dumps(item.meta, sort_keys=True, default=str, ensure_ascii=True)})
        else:
            quarantine.append({"source": source, "reason": item.reason, "error": _clean(item.error)})
    index.update(records=len(items), docs=len(docs), quarantined=len(quarantine),
                 status="error" if sf.error else ("ok" if not quarantine else ("partial" if docs else "quarantined")))
    return docs, quarantine, index


def _parse_items(sf: SourceFile, data: bytes, cfg: IngestConfig) -> list[Doc | Problem]:
    ctx = Context(cfg, deadline=time.monotonic() + cfg.file_timeout_s)
    return parse_guarded(lambda: read_blob(sf.rel, data, ctx), cfg.file_timeout_s)


def parse_batch(files: list[SourceFile], cfg: IngestConfig) -> BatchResult:
    """Parse a batch of files: the unit of work sent to an executor."""
    docs: list[dict[str, Any]] = []
    result = BatchResult(docs=DOCUMENT_SCHEMA.empty_table())
    for sf in files:
        d, q, idx = parse_file(sf, cfg)
        docs.extend(d)
        result.quarantine.extend(q)
        result.index.append(idx)
        result.bytes_read += max(idx["size"], 0) if idx["sha256"] else 0
    result.docs = pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA)
    return result


def make_batches(files: list[SourceFile], cfg: IngestConfig) -> list[list[SourceFile]]:
    """Group files into batches of at most `batch_files` files and about `batch_bytes` bytes."""
    batches: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    size = 0
    for sf in files:
        if current and (len(current) >= cfg.batch_files or size + max(sf.size, 0) > cfg.batch_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(sf)
        size += max(sf.size, 0)
    if current:
        batches.append(current)
    return batches


# -- the previous run's state ----------------------------------------------------------------


def _outputs_in(directory: Path) -> list[Path]:
    return [*document_files(directory), *(p for p in (directory / QUARANTINE_FILE, directory / INDEX_FILE) if p.exists())]


def _set_aside_previous(stage_dir: Path) -> Path:
    """Move the last complete outputs into `.previous/` so new parts can take their names.

    The index moves last; a `.previous/` holding an index is a complete earlier state (the
    new outputs beside it are from an interrupted run and are discarded).
    """
    prev = stage_dir / PREVIOUS_DIR
    (stage_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the outputs are about to change
    if (prev / INDEX_FILE).exists():
        for path in _outputs_in(stage_dir):
            path.unlink()
        return prev
    prev.mkdir(exist_ok=True)
    for path in sorted(_outputs_in(stage_dir), key=lambda p: p.name == INDEX_FILE):
        os.replace(path, prev / path.name)
    return prev


def _read_index(prev: Path, cfg: IngestConfig) -> dict[str, dict[str, Any]]:
    """The previous file index; rows lose their hash when the parse settings changed since."""
    path = prev / INDEX_FILE
    if not path.exists():
        return {}
    pf = pq.ParquetFile(path)
    stored = (pf.schema_arrow.metadata or {}).get(_CONFIG_KEY, b"").decode()
    rows = {row["source"]: row for row in pf.read().to_pylist()}
    if stored != parse_config_hash(cfg):  # every file parses differently now: all count as changed
        rows = {k: {**row, "sha256": None} for k, row in rows.items()}
    return rows


def _sha256(sf: SourceFile, limit: int) -> str | None:
    try:
        h = hashlib.sha256()
        n = 0
        with open_source(sf) as f:
            while block := f.read(1 << 20):
                h.update(block)
                n += len(block)
                if n > limit:
                    return None
        return h.hexdigest()
    except OSError:
        return None


@dataclass
class Plan:
    parse: list[SourceFile] = field(default_factory=list)
    unchanged: dict[str, dict[str, Any]] = field(default_factory=dict)  # uri -> index row
    new: int = 0
    changed: int = 0
    errors: int = 0
    removed: int = 0


def plan_run(files: list[SourceFile], previous: dict[str, dict[str, Any]], cfg: IngestConfig) -> Plan:
    """Which files to parse: new ones, and those whose content hash changed."""
    plan = Plan()
    for sf in files:
        old = previous.get(sf.uri)
        if sf.error:
            plan.errors += 1
            plan.parse.append(sf)
        elif old is None or old["status"] == "error" or old["sha256"] is None:
            plan.new += old is None
            plan.changed += old is not None
            plan.parse.append(sf)
        elif old["size"] == sf.size and old["mtime_ns"] == sf.mtime_ns:
            plan.unchanged[sf.uri] = old
        elif old["size"] == sf.size and _sha256(sf, cfg.max_file_bytes) == old["sha256"]:
            plan.unchanged[sf.uri] = {**old, "mtime_ns": sf.mtime_ns}  # touched, not changed
        else:
            plan.changed += 1
            plan.parse.append(sf)
    plan.removed = len(set(previous) - {sf.uri for sf in files})
    return plan


def _carry_over(prev: Path, keep: dict[str, Any], docs: PartWriter, quarantine: ParquetWriter) -> None:
    """Copy the rows of unchanged files from the previous outputs, without parsing anything."""
    if not keep:
        return
    for batch in iter_batches(document_files(prev)):
        sources = batch.column("source").to_pylist()
        mask = pa.array([file_of(s, keep) in keep for s in sources])
        if (kept := batch.filter(mask)).num_rows:
            docs.write(kept)
    if (prev / QUARANTINE_FILE).exists():
        table = pq.read_table(prev / QUARANTINE_FILE)
        mask = pa.array([file_of(s, keep) in keep for s in table.column("source").to_pylist()], pa.bool_())
        quarantine.write(table.filter(mask))


# -- the stage -------------------------------------------------------------------------------


def _map_batches(
    batches: list[list[SourceFile]], cfg: IngestConfig, executor: Executor | None, files: list[SourceFile]
) -> Iterator[BatchResult]:
    """Parsed batches in order, through `executor`, a pool of `cfg.workers` processes, or in-process."""
    work = ((batch, cfg) for batch in batches)
    in_memory = any(sf.protocol == "memory" for sf in files)  # an in-memory filesystem lives in this process
    # Starting processes costs seconds: worth it only with a few batches for each of them.
    if executor is not None or cfg.workers <= 1 or len(batches) < 2 * cfg.workers or in_memory:
        yield from map_in_order(parse_batch, work, executor)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        yield from map_in_order(parse_batch, work, pool)


def run_ingest(
    sources: list[str],
    stage_dir: Path,
    cfg: IngestConfig,
    progress: bool = True,
    executor: Executor | None = None,
) -> StageResult:
    """Read every source into `stage_dir`: documents, quarantine and the file index.

    Incremental: files whose content is unchanged since the last run are carried over
    without parsing. Batches are parsed through `executor` when given; otherwise in a pool
    of `cfg.workers` processes (in-process when `workers == 1`). Results are identical.
    """
    t0 = time.perf_counter()
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(stage_dir)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    inside = str(stage_dir.resolve()) + os.sep
    # Never read our own outputs when the stage directory sits inside a source folder.
    files = [sf for sf in list_sources([str(s) for s in sources], cfg)
             if not (sf.is_local and os.path.abspath(sf.path).startswith(inside))]
    prev = _set_aside_previous(stage_dir)
    plan = plan_run(files, _read_index(prev, cfg), cfg)
    t_list = time.perf_counter() - t0

    docs = PartWriter(stage_dir, schema=DOCUMENT_SCHEMA, rows_per_part=ROWS_PER_PART)
    quarantine = ParquetWriter(stage_dir / QUARANTINE_FILE, schema=QUARANTINE_SCHEMA)
    reasons: Counter[str] = Counter()
    # The index describes the sources, not this run: which files a run parsed is in its metrics, so a
    # re-run (or a resumed run) over the same sources writes the same index, byte for byte.
    index_rows = [{k: row.get(k) for k in INDEX_SCHEMA.names} for row in plan.unchanged.values()]
    try:
        _carry_over(prev, plan.unchanged, docs, quarantine)
        carried_docs = docs.rows
        t_parse = time.perf_counter()
        bytes_read = 0
        batches = make_batches(plan.parse, cfg)
        with tqdm(total=len(plan.parse), unit="file", desc="ingest", disable=not progress) as bar:
            for result in _map_batches(batches, cfg, executor, plan.parse):
                if result.docs.num_rows:
                    docs.write(result.docs)
                quarantine.write(result.quarantine)
                index_rows.extend(result.index)
                bytes_read += result.bytes_read
                bar.update(len(result.index))
        t_parse = time.perf_counter() - t_parse
        parts = docs.close()
        q_out = quarantine.close(stage_dir)
    except BaseException:
        quarantine.abort()
        raise
    for batch in iter_batches([stage_dir / QUARANTINE_FILE], columns=["reason"]):
        reasons.update(batch.column("reason").to_pylist())
    index_out = _write_index(stage_dir, index_rows, cfg)
    shutil.rmtree(prev, ignore_errors=True)

    kept = sum(p.rows for p in parts)
    counts = Counts(**{"in": kept + sum(reasons.values())}, kept=kept, dropped=dict(sorted(reasons.items())))
    counts.check(STAGE)
    parsed_docs = kept - carried_docs
    elapsed = time.perf_counter() - t0
    metrics = {
        "files": float(len(files)),
        "bytes_in": float(sum(max(sf.size, 0) for sf in files)),
        "bytes_parsed": float(bytes_read),
        "docs_parsed": float(parsed_docs),
        "docs_per_s": parsed_docs / t_parse if t_parse > 0 else 0.0,
        "mb_per_s": bytes_read / 1e6 / t_parse if t_parse > 0 else 0.0,
        "files_new": float(plan.new),
        "files_changed": float(plan.changed),
        "files_unchanged": float(len(plan.unchanged)),
        "files_removed": float(plan.removed),
        "files_unlisted_errors": float(plan.errors),
        "files_quarantined": float(sum(1 for r in index_rows if r["status"] in ("quarantined", "error"))),
        "seconds": elapsed,
    }
    return StageResult(
        outputs=[*parts, q_out, index_out],
        counts=counts,
        metrics=metrics,
        extra={"timings": {"list": t_list, "parse": t_parse, "total": elapsed},
               "quarantine_reasons": dict(sorted(reasons.items()))},
    )


def _write_index(stage_dir: Path, rows: Iterable[dict[str, Any]], cfg: IngestConfig):  # noqa: ANN202
    rows = sorted(rows, key=lambda r: r["source"])
    schema = INDEX_SCHEMA.with_metadata({_CONFIG_KEY: parse_config_hash(cfg).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    writer = ParquetWriter(stage_dir / INDEX_FILE, schema=schema)
    writer.write(table)
    return writer.close(stage_dir)

