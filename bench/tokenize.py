"""Tokenization benchmark: Refinery's shards stage against the bare ceiling and datatrove.

One process run, the same texts for everyone:
- ceiling: `tokenizers` `encode_batch` over texts already in memory (no reading,
  no writing), with and without taking the ids out of the encodings;
- Refinery: `run_encode` end to end, curated Parquet -> token shards on disk,
  in-process (the tokenizer's threads) and with a pool of worker processes;
- datatrove: `ParquetReader` -> `DocumentTokenizer` (no shuffling), one task and
  one task per core;
- the loader: random windows served by `TokenWindows` over the shards written.

The corpus is built from text files found on this machine (Python sources,
Markdown/reST, plain text, HTML), cut into documents of a few kilobytes.

    python -m bench.tokenize [--mb 32] [--repeat 3] [--record]

Every row is the best of `--repeat` runs (as `timeit` reports), since a 2-core
machine's timings vary by 10% from run to run.

`--record` appends the table to bench/RESULTS.md with the machine described.
Requires datatrove for its rows (`pip install datatrove`); without it they are skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from bench.common import machine, record
from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter
from refinery.storage.shards import TokenWindows
from refinery.tasks.encode import ShardsConfig, run_encode
from refinery.tasks.tokenizer import EOT, TokenizerConfig, load_tokenizer, run_train_tokenizer

PACKAGES = ("tokenizers", "pyarrow", "numpy", "datatrove")
FORMATS = {".py": "code", ".md": "markdown", ".rst": "markdown", ".txt": "text", ".html": "html"}
SEARCH_ROOTS = [Path(sys.prefix), Path(sys.base_prefix), Path("/usr/share/doc"), Path("/usr/lib/python3")]


def build_corpus(target_bytes: int, doc_bytes: int = 3000) -> list[dict[str, object]]:
    """Documents of about `doc_bytes`, cut at line ends, from local text files (lines over 400 chars skipped)."""
    rows: list[dict[str, object]] = []
    total = 0
    seen: set[Path] = set()
    per_format = target_bytes // len(set(FORMATS.values()))
    budget = dict.fromkeys(FORMATS.values(), 0)
    for root in SEARCH_ROOTS:
        for path in sorted(root.rglob("*")):
            fmt = FORMATS.get(path.suffix)
            if fmt is None or budget[fmt] >= per_format or path in seen or not path.is_file():
                continue
            seen.add(path)
            try:
                lines = [ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if len(ln) < 400]
            except (UnicodeDecodeError, OSError):
                continue
            doc: list[str] = []
            size = 0
            for line in lines + [None]:
                if line is not None:
                    doc.append(line)
                    size += len(line)
                if (line is None or size >= doc_bytes) and doc:
                    text = "".join(doc)
                    n = len(text.encode("utf-8"))
                    rows.append({"id": f"{path}#{len(rows)}", "text": text, "source": f"{path}#{len(rows)}",
                                 "format": fmt, "bytes": n, "meta": "{}"})
                    budget[fmt] += n
                    total += n
                    doc, size = [], 0
            if total >= target_bytes:
                return rows
    return rows


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_of(repeat: int, fn):  # noqa: ANN001, ANN201
    """Fastest of `repeat` calls `fn(i)` (i numbers the call, for fresh output folders), and its result.

    Only the fastest result is kept: holding every run's encodings would slow the later runs.
    """
    best: tuple[float, object] | None = None
    for i in range(repeat):
        run = timed(lambda i=i: fn(i))
        if best is None or run[0] < best[0]:
            best = run
        del run
    return best


def run_datatrove(parquet_dir: Path, tokenizer_file: Path, out: Path, tasks: int) -> float | None:
    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import ParquetReader
        from datatrove.pipeline.tokens import DocumentTokenizer
    except ImportError:
        return None
    pipeline = [
        ParquetReader(str(parquet_dir), text_key="text", id_key="id", glob_pattern="part-*.parquet"),
        DocumentTokenizer(str(out), tokenizer_name_or_path=str(tokenizer_file), eos_token=EOT,
                          shuffle_documents=False, save_final_metadata=False),
    ]
    executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=str(out / "logs"))
    seconds, _ = timed(executor.run)
    return seconds


def loader_rate(files: list[Path], seq_len: int = 1024, batch: int = 32, steps: int = 200) -> float:
    tw = TokenWindows(files, seq_len, seed=0)
    tw.get_batch(0, batch)
    seconds, _ = timed(lambda: [tw.get_batch(s, batch) for s in range(steps)])
    return steps * batch * (seq_len + 1) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="refinery-bench-") as tmp:
        root = Path(tmp)
        rows = build_corpus(int(args.mb * 1e6))
        writer = PartWriter(root / "curated", schema=DOCUMENT_SCHEMA, rows_per_part=2000)  # several files, so datatrove can use one task per core
        for start in range(0, len(rows), 2000):
            writer.write(pa.Table.from_pylist(rows[start : start + 2000], schema=DOCUMENT_SCHEMA))
        writer.close()
        files = sorted((root / "curated").glob("part-*.parquet"))
        texts = [str(r["text"]) for r in rows]
        mb = sum(int(r["bytes"]) for r in rows) / 1e6
        formats = sorted({str(r["format"]) for r in rows})
        print(f"corpus: {len(rows)} documents, {mb:.1f} MB, {len(files)} Parquet files, formats {formats}")

        train_s, tok_result = timed(lambda: run_train_tokenizer(
            files, root / "tokenizer", TokenizerConfig(sample_bytes=16 * 2**20), progress=False))
        tokenizer_file = root / "tokenizer" / "tokenizer.json"
        print(f"tokenizer: trained in {train_s:.1f} s, {tok_result.metrics['bytes_per_token']:.2f} bytes/token on val")

        tok, _ = load_tokenizer(tokenizer_file)
        results: list[tuple[str, float]] = []
        n = args.repeat
        seconds, _ = best_of(n, lambda i: len(tok.encode_batch(texts)))
        results.append(("ceiling: tokenizers encode_batch (in memory)", seconds))
        seconds, _ = best_of(n, lambda i: len([e.ids for e in tok.encode_batch(texts)]))
        results.append(("ceiling: encode_batch + ids (in memory)", seconds))
        seconds, _ = best_of(n, lambda i: len([e.ids for e in tok.encode_batch_fast(texts)]))
        results.append(("ceiling: encode_batch_fast + ids (in memory)", seconds))

        for workers in (1, 2):
            cfg = ShardsConfig(workers=workers)
            seconds, enc = best_of(n, lambda i, cfg=cfg, w=workers: run_encode(
                files, tokenizer_file, root / f"shards-{w}-{i}", cfg, progress=False))
            label = "in-process, tokenizer threads" if workers == 1 else f"{workers} worker processes"
            results.append((f"Refinery run_encode, Parquet -> shards ({label})", seconds))
        train_files = [root / "shards-2-0" / f for f in enc.extra["train_files"]]

        for tasks in (1, 2):
            runs = [run_datatrove(root / "curated", tokenizer_file, root / f"datatrove-{tasks}-{i}", tasks)
                    for i in range(n)]
            if None not in runs:
                results.append((f"datatrove DocumentTokenizer, Parquet -> .ds ({tasks} task(s))", min(runs)))

        rate = loader_rate(train_files)

    ceiling = results[0][1]
    best_dt = min((s for name, s in results if name.startswith("datatrove")), default=None)
    lines = [
        f"### tokenize: {len(rows)} documents, {mb:.1f} MB of text, best of {args.repeat} runs per row",
        "",
        "| run | seconds | MB/s | vs encode_batch ceiling | vs best datatrove |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in results:
        vs_dt = f"{best_dt / seconds:.2f}x" if best_dt else "n/a"
        lines.append(f"| {name} | {seconds:.2f} | {mb / seconds:.2f} | {ceiling / seconds:.0%} | {vs_dt} |")
    lines += ["", f"Loader: {rate / 1e6:.0f} M tokens/s of windows (seq_len 1024, batch 32, TokenWindows.get_batch)."]
    table = "\n".join(lines)
    print(f"{table}\n\nMachine: {machine(*PACKAGES)}\n")
    if args.record:
        record(table, *PACKAGES)


if __name__ == "__main__":
    main()
