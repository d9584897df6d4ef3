"""The ingest stage: list the sources, parse what is new or changed, write the documents table.

Outputs in the stage directory, always describing the full current state of the sources:
- `part-NNNNN.parquet`: documents (DOCUMENT_SCHEMA);
- `quarantine.parquet`: every raw record that could not be read (`source`, `reason`, `error`);
- `files.parquet`: the file index (URI, size, mtime, sha256, records, status) that makes the
  next run incremental: files with the same content hash are carried over without parsing,
  new and changed files are parsed, removed files' documents disappear.

Parsing is a pure function of a batch of work units (`parse_batch`; see `units.py`: a whole
file, or a range of a big dataset file), mapped through an executor when one is given (a Dask
`client.get_executor()`, a process pool) with a bounded window of batches in flight. Workers
write what they parse to spill files under `.units/` and return paths and counts; the driver
appends them to the outputs in order, so results are identical however it runs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
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
from refinery.tasks.ingest.base import Context, Doc, Item, Problem, ReadError, Rows
from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.formats import detect, read_blob
from refinery.tasks.ingest.sources import SourceFile, list_sources, open_source
from refinery.tasks.ingest.units import (
    PARQUET_RATIO,
    Unit,
    dataset_kind,
    file_sha256,
    file_units,
    unit_items,
    warc_unit_bytes,
)
from refinery.tasks.ingest.watchdog import parse_guarded
from refinery.tasks.parallel import map_in_order

STAGE = "ingest"
QUARANTINE_FILE = "quarantine.parquet"
INDEX_FILE = "files.parquet"
PREVIOUS_DIR = ".previous"
SPILL_DIR = ".units"  # workers' output files, copied into the outputs as they arrive
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
PARSE_VERSION = 4  # 2: dataset files streamed by record (text field detection, meta columns, CSV/TSV);
# 3: JSON arrays streamed by element, archives by member (limits per member), WARC files split into units;
# 4: Parquet, Arrow and CSV/TSV archive members read record by record (no max_file_bytes); .tsv.gz by tabs


def parse_config_hash(cfg: IngestConfig) -> str:
    """Hash of the settings that change what a file parses into (not which files or how fast)."""
    keys = cfg.model_dump(mode="json", exclude={"include", "exclude", "workers", "batch_files", "batch_bytes",
                                                 "units_in_flight"})
    return stable_hash({"config": keys, "code": __version__, "parse": PARSE_VERSION})


def doc_id(source: str) -> str:
    """Stable 32-hex id of a record: a hash of its source URI, which includes its position."""
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def file_of(source: str, files: set[str] | dict[str, Any]) -> str:
    """The file URI a document or quarantine source (`uri` or `uri#n`) came from."""
    if source in files:
        return source
    cut = source.rfind("#")
    return source[:cut] if cut > 0 else source


# -- parsing one batch of units (pure, runs anywhere) ----------------------------------------


@dataclass
class BatchResult:
    """What a worker hands back: paths of its spill files and counts, never the documents themselves.

    `docs`/`quarantine` are Arrow IPC stream files the driver copies into the outputs and
    deletes (`docs` is a finished Parquet part, moved into place, for a big unit); `index` holds
    one partial index row per unit; `discard` names files whose
    documents must be dropped after all (a decompression bomb found part-way).
    """

    docs: str | None = None
    quarantine: str | None = None
    index: list[dict[str, Any]] = field(default_factory=list)
    discard: list[str] = field(default_factory=list)
    bytes_read: int = 0
    tables: dict[str, list[pa.Table]] | None = None  # the rows themselves, when parsed without a spill folder


def _clean(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates from a parser: Parquet needs valid UTF-8
        return text.encode("utf-8", "replace").decode("utf-8")


def _whole_file(sf: SourceFile, cfg: IngestConfig, index: dict[str, Any]) -> list[Doc | Problem]:
    """A single-document file (or archive), read whole under `max_file_bytes` and `file_timeout_s`."""
    if sf.error:
        return [Problem(*sf.error)]
    if sf.size > cfg.max_file_bytes:
        return [Problem("too_large", f"{sf.size} bytes is over max_file_bytes={cfg.max_file_bytes}")]
    try:
        with open_source(sf) as f:
            data = f.read(cfg.max_file_bytes + 1)
    except OSError as exc:
        return [Problem("unreadable", f"{exc.strerror or exc}; check the file's permissions")]
    index["sha256"] = hashlib.sha256(data).hexdigest()
    index["kind"] = detect(sf.rel, data)  # a format may claim a file by its content
    index["size"] = len(data) if sf.size < 0 else sf.size
    index["bytes"] = len(data)
    if len(data) > cfg.max_file_bytes:
        return [Problem("too_large", f"over max_file_bytes={cfg.max_file_bytes}")]
    return _parse_items(sf, data, cfg)


def _parse_items(sf: SourceFile, data: bytes, cfg: IngestConfig) -> list[Doc | Problem]:
    ctx = Context(cfg, deadline=time.monotonic() + cfg.file_timeout_s)
    return parse_guarded(lambda: read_blob(sf.rel, data, ctx), cfg.file_timeout_s)


def _dataset_unit(unit: Unit, cfg: IngestConfig, index: dict[str, Any]) -> Iterator[Item | Rows]:
    """The records of a dataset unit, with any failure as a trailing Problem (what was read is kept)."""
    sf = unit.file
    index["kind"] = unit.kind
    index["bytes"] = unit.nbytes if unit.nbytes >= 0 else max(sf.size, 0)
    try:
        if unit.hash_file:
            index["sha256"] = file_sha256(sf)
        elif unit.sha256:
            index["sha256"] = unit.sha256
        if unit.whole and sf.size == 0:
            raise ReadError("empty", "zero-byte file")
        yield from unit_items(unit, Context(cfg, deadline=float("inf")))
    except ReadError as exc:
        if unit.part > 0 and exc.reason == "missing_text_column":
            return  # the file's first unit reported it
        yield Problem(exc.reason, exc.message)
    except OSError as exc:
        yield Problem("unreadable", f"{exc.strerror or exc}; check the file's permissions")
    except MemoryError:
        yield Problem("too_large", "ran out of memory on one record; lower max_record_bytes")
    except RecursionError:
        yield Problem("parse_error", "structure nested too deeply to parse")
    except Exception as exc:  # noqa: BLE001 (a parser bug on one file must not stop the run)
        yield Problem("parse_error", f"{type(exc).__name__}: {exc}")


class _Spill:
    """A worker's output for one batch: documents and quarantine rows in Arrow IPC stream files.

    Uncompressed and written as they come, so a worker holds one block of records at a time;
    the driver streams them into the stage's Parquet outputs.
    """

    FLUSH_ROWS = 1024

    def __init__(self, directory: str | None, parquet: bool = False) -> None:
        self.directory = directory
        self.parquet = parquet and directory is not None  # documents straight to a Parquet part (big units)
        self.paths: dict[str, str] = {}
        self._writers: dict[str, Any] = {}
        self._docs: list[dict[str, Any]] = []
        self._problems: list[dict[str, str]] = []
        self.memory: dict[str, list[pa.Table]] = {"docs": [], "quarantine": []}

    def _write(self, what: str, table: pa.Table) -> None:
        if self.directory is None:
            self.memory[what].append(table)
            return
        writer = self._writers.get(what)
        if writer is None:
            name = f"{what}-{os.getpid()}-{uuid.uuid4().hex}"
            if what == "docs" and self.parquet:
                path = os.path.join(self.directory, name + ".parquet")
                writer = self._writers[what] = ParquetWriter(path, schema=DOCUMENT_SCHEMA)
            else:
                path = os.path.join(self.directory, name + ".arrow")
                writer = self._writers[what] = pa.ipc.new_stream(path, table.schema)
            self.paths[what] = path
        if isinstance(writer, ParquetWriter):
            writer.write(table)
        else:
            writer.write_table(table)

    def discard_docs(self) -> None:
        """Drop the documents written so far (the whole unit was a bomb); only for a Parquet spill."""
        self._docs = []
        writer = self._writers.pop("docs", None)
        if writer is not None:
            writer.abort()
            self.paths.pop("docs")

    def rows(self, uri: str, rows: Rows) -> None:
        self.flush()
        sources = [f"{uri}#{p}" for p in rows.pos]
        text = rows.text if rows.text.type == pa.large_string() else rows.text.cast(pa.large_string())
        nbytes = pa.array(rows.nbytes, pa.int64()) if rows.nbytes is not None else pc.binary_length(text).cast(pa.int64())
        table = pa.Table.from_arrays(
            [pa.array([doc_id(s) for s in sources], pa.string()), text, pa.array(sources, pa.string()),
             pa.array([rows.format] * len(sources), pa.string()), nbytes, pa.array(rows.meta, pa.string())],
            schema=DOCUMENT_SCHEMA,
        )
        self._write("docs", table)

    def doc(self, uri: str, item: Doc) -> None:
        source = uri if item.pos is None else f"{uri}#{item.pos}"
        self._docs.append({"id": doc_id(source), "text": _clean(item.text), "source": source, "format": item.format,
                           "bytes": item.nbytes,
                           "meta": json.dumps(item.meta, sort_keys=True, default=str, ensure_ascii=True)})
        if len(self._docs) >= self.FLUSH_ROWS:
            self.flush()

    def problem(self, uri: str, item: Problem) -> None:
        source = uri if item.pos is None else f"{uri}#{item.pos}"
        self._problems.append({"source": source, "reason": item.reason, "error": _clean(item.error)})
        if len(self._problems) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._docs:
            self._write("docs", pa.Table.from_pylist(self._docs, schema=DOCUMENT_SCHEMA))
            self._docs = []
        if self._problems:
            self._write("quarantine", pa.Table.from_pylist(self._problems, schema=QUARANTINE_SCHEMA))
            self._problems = []

    def close(self) -> None:
        self.flush()
        for writer in self._writers.values():
            writer.close()

    def abort(self) -> None:
        for what, writer in self._writers.items():
            if isinstance(writer, ParquetWriter):
                writer.abort()
            else:
                writer.close()
                os.unlink(self.paths[what])


def parse_unit(unit: Unit, cfg: IngestConfig, spill: _Spill) -> tuple[dict[str, Any], bool]:
    """Parse one unit into `spill`: its partial index row, and whether its documents must be discarded."""
    sf = unit.file
    index: dict[str, Any] = {"source": sf.uri, "rel": sf.rel, "size": sf.size, "mtime_ns": sf.mtime_ns,
                             "sha256": None, "kind": detect(sf.rel), "records": 0, "docs": 0, "quarantined": 0,
                             "error": sf.error is not None, "bytes": 0, "part": unit.part, "last": unit.last}
    items: Iterable[Item | Rows] = (_whole_file(sf, cfg, index) if unit.kind is None or sf.error
                                    else _dataset_unit(unit, cfg, index))
    discard = False
    for item in items:
        if isinstance(item, Rows):
            spill.rows(sf.uri, item)
            index["docs"] += len(item.pos)
            index["records"] += len(item.pos)
            continue
        index["records"] += 1
        if isinstance(item, Doc):
            spill.doc(sf.uri, item)
            index["docs"] += 1
        else:
            if item.reason == "decompression_limit" and item.pos is None and unit.kind is not None:
                discard = True  # a bomb: one row, none of what it expanded to (as for archives)
            spill.problem(sf.uri, item)
            index["quarantined"] += 1
    if discard:
        index.update(records=1, docs=0, quarantined=1)
    if index["records"] == 0 and unit.whole:
        spill.problem(sf.uri, Problem("no_records", "file holds no records"))
        index.update(records=1, quarantined=1)
    return index, discard


def parse_batch(units: list[Unit] | list[SourceFile], cfg: IngestConfig, spill_dir: str | None = None) -> BatchResult:
    """Parse a batch of units (or whole files): the unit of work sent to an executor.

    With `spill_dir`, documents and quarantine rows go to IPC files there and only their
    paths come back; without, they come back as tables (small inputs, tests).
    """
    units = [Unit(u, None if u.error else dataset_kind(u.rel), hash_file=True) if isinstance(u, SourceFile) else u
             for u in units]
    # A big dataset unit is a batch on its own: its worker encodes the Parquet part too, in parallel.
    big = len(units) == 1 and units[0].kind is not None and (not units[0].whole or units[0].file.size > cfg.batch_bytes)
    spill = _Spill(spill_dir, parquet=big)
    result = BatchResult()
    try:
        for unit in units:
            index, discard = parse_unit(unit, cfg, spill)
            result.index.append(index)
            nbytes = index.pop("bytes")
            result.bytes_read += nbytes if index["sha256"] or unit.kind else 0
            if discard:
                if spill.parquet:
                    spill.discard_docs()
                else:
                    result.discard.append(unit.file.uri)
        spill.close()
    except BaseException:
        spill.abort()
        raise
    result.docs, result.quarantine = spill.paths.get("docs"), spill.paths.get("quarantine")
    if spill_dir is None:
        result.tables = spill.memory
    return result


def make_batches(files: list[SourceFile], cfg: IngestConfig) -> Iterator[list[Unit]]:
    """Units in batches: small files grouped up to `batch_files` files and about `batch_bytes` bytes,
    each unit of a split file on its own. Lazy, so the scan of a big file overlaps the work on its first units."""
    current: list[Unit] = []
    size = 0
    for sf in files:
        for unit in file_units(sf, cfg):
            if not unit.whole:
                if current:
                    yield current
                    current, size = [], 0
                yield [unit]
                continue
            if current and (len(current) >= cfg.batch_files or size + max(sf.size, 0) > cfg.batch_bytes):
                yield current
                current, size = [], 0
            current.append(unit)
            size += max(sf.size, 0)
    if current:
        yield current


def _estimate_batches(files: list[SourceFile], cfg: IngestConfig) -> int:
    """About how many batches `make_batches` yields, without reading anything."""
    n, count, size = 0, 0, 0
    for sf in files:
        kind = dataset_kind(sf.rel)
        if kind == "parquet" and sf.size > cfg.batch_bytes // PARQUET_RATIO:
            n += -(-sf.size * PARQUET_RATIO // cfg.batch_bytes)
            continue
        if kind == "jsonl" and sf.size > cfg.batch_bytes:
            n += -(-sf.size // cfg.batch_bytes)
            continue
        unit = warc_unit_bytes(sf.rel, cfg)
        if kind == "warc" and sf.size > unit and sf.rel.lower().endswith((".warc", ".warc.gz")):
            n += -(-sf.size // unit)  # split at record starts (`units.file_units`)
            continue
        if count and (count >= cfg.batch_files or size + max(sf.size, 0) > cfg.batch_bytes):
            n, count, size = n + 1, 0, 0
        count += 1
        size += max(sf.size, 0)
    return n + (1 if count else 0)


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


def _sha256(sf: SourceFile, limit: int | float) -> str | None:
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


def _hash_limit(sf: SourceFile, cfg: IngestConfig) -> int | float:
    """Files past `max_file_bytes` are never parsed, so never hashed; dataset files have no such bound."""
    return float("inf") if dataset_kind(sf.rel) else cfg.max_file_bytes


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
        elif old["size"] == sf.size and _sha256(sf, _hash_limit(sf, cfg)) == old["sha256"]:
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
    files: list[SourceFile], cfg: IngestConfig, executor: Executor | None, spill_dir: Path
) -> Iterator[BatchResult]:
    """Parsed batches in order, through `executor`, a pool of `cfg.workers` processes, or in-process.

    At most `units_in_flight` batches (default two per worker) are submitted and not yet
    collected; each comes back as spill-file paths, so the driver holds no documents.
    """
    work = ((batch, cfg, str(spill_dir)) for batch in make_batches(files, cfg))
    in_memory = any(sf.protocol == "memory" for sf in files)  # an in-memory filesystem lives in this process
    # Starting processes costs seconds: worth it only with a few batches for each of them.
    if executor is not None or cfg.workers <= 1 or _estimate_batches(files, cfg) < 2 * cfg.workers or in_memory:
        yield from map_in_order(parse_batch, work, executor, cfg.units_in_flight)
        return
    ctx = multiprocessing.get_context("spawn")
    in_flight = cfg.units_in_flight or 2 * cfg.workers
    with concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        yield from map_in_order(parse_batch, work, pool, in_flight)


def _copy_spill(path: str | None, writer: PartWriter | ParquetWriter, discard: set[str], files: set[str]) -> None:
    """Stream a worker's spill file into an output (read batch by batch, not memory-mapped) and delete it."""
    if path is None:
        return
    if path.endswith(".parquet"):  # a part the worker encoded itself
        assert isinstance(writer, PartWriter) and not discard
        writer.adopt(path)
        return
    with pa.OSFile(path) as f:
        for batch in pa.ipc.open_stream(f):
            if discard:
                keep = [file_of(s, files) not in discard for s in batch.column("source").to_pylist()]
                batch = batch.filter(pa.array(keep, pa.bool_()))
            if batch.num_rows:
                writer.write(batch)
    os.unlink(path)


class _IndexMerge:
    """Index rows of files from the partial rows of their units (which arrive in order)."""

    def __init__(self) -> None:
        self.open: dict[str, dict[str, Any]] = {}

    def add(self, part: dict[str, Any]) -> dict[str, Any] | None:
        """Fold in one unit's row; the file's finished index row when it was its last unit."""
        row = self.open.pop(part["source"], None)
        if row is None:
            row = part
        else:
            for key in ("records", "docs", "quarantined"):
                row[key] += part[key]
            row["sha256"] = row["sha256"] or part["sha256"]
            row["error"] = row["error"] or part["error"]
        if not part["last"]:
            self.open[part["source"]] = row
            return None
        docs, quarantined = row["docs"], row["quarantined"]
        row["status"] = "error" if row["error"] else ("ok" if not quarantined else ("partial" if docs else "quarantined"))
        return {k: row.get(k) for k in INDEX_SCHEMA.names}


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
        merge = _IndexMerge()
        uris = {sf.uri for sf in plan.parse}
        spill_dir = stage_dir / SPILL_DIR
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir()
        with tqdm(total=len(plan.parse), unit="file", desc="ingest", disable=not progress) as bar:
            for result in _map_batches(plan.parse, cfg, executor, spill_dir):
                discard = set(result.discard)
                _copy_spill(result.docs, docs, discard, uris)
                _copy_spill(result.quarantine, quarantine, set(), uris)
                bytes_read += result.bytes_read
                for part in result.index:
                    if (row := merge.add(part)) is not None:
                        if row["records"] == 0:  # a split file that held nothing after all
                            quarantine.write([{"source": row["source"], "reason": "no_records",
                                               "error": "file holds no records"}])
                            row.update(records=1, quarantined=1, status="quarantined")
                        index_rows.append(row)
                        bar.update(1)
        shutil.rmtree(spill_dir, ignore_errors=True)
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

