"""Tokenization benchmark: Refinery's shards stage against the bare ceiling and datatrove.

One process run, the same texts for everyone:
- ceiling: `tokenizers` `encode_batch` over texts already in memory (no reading,
  no writing), with and without taking the ids out of the encodings, and the
  fast encoders the same way (`gigatoken` `encode_batch` over the Arrow column,
  `fastokens` `encode_batch_flat` over Python strings);
- Refinery: `run_encode` end to end, curated Parquet -> token shards on disk,
  with the fast encoder behind its parity gate (`shards.encoder=auto`, which
  picks gigatoken), with `fastokens` and with `tokenizers` only, in-process and
  with a pool of worker processes; and the first run in a fresh process (parity
  gate checked, libraries imported, tokenizers loaded), as a command-line run
  is. The ids of every document in the shards are checked against `tokenizers`
  `encode_batch` plus the end-of-text id, and the shard files of all encoders
  and worker counts must be identical;
- datatrove: `ParquetReader` -> `DocumentTokenizer` (no shuffling), one task and
  one task per core;
- the loader: random windows served by `TokenWindows` over the shards written;
- tokenizer training: `tokenizers`' `BpeTrainer` against the fast trainer
  (`gigatoken.train_bpe`) on the same `--train-mb` of text, merges compared.

The corpus is built from text files found on this machine (Python sources,
Markdown/reST, plain text, HTML), cut into documents of a few kilobytes; when
the machine holds less text than asked for, the documents are repeated (said in
the output).

    python -m bench.tokenize [--mb 32] [--train-mb 100] [--repeat 3] [--record]

Every row is the best of `--repeat` runs (as `timeit` reports), since a 2-core
machine's timings vary by 10% from run to run.

`--record` appends the table to bench/RESULTS.md with the machine described.
Requires datatrove for its rows (`pip install datatrove`); without it they are skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import machine, record
from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter
from refinery.storage.manifest import file_sha256
from refinery.storage.shards import TokenWindows, read_shard
from refinery.tasks.encode import FastokensEncoder, GigatokenEncoder, ShardsConfig, run_encode
from refinery.tasks.tokenizer import (
    EOT,
    TokenizerConfig,
    load_tokenizer,
    run_train_tokenizer,
    train_bpe_fast,
    train_bpe_reference,
)

PACKAGES = ("tokenizers", "fastokens", "gigatoken", "pyarrow", "numpy", "datatrove")
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


def repeated(rows: list[dict[str, object]], target_bytes: int) -> tuple[list[dict[str, object]], int]:
    """`rows` cycled (with fresh ids) until they hold `target_bytes`; also how many times they were used."""
    have = sum(int(r["bytes"]) for r in rows)
    if not rows or have >= target_bytes:
        return rows, 1
    out = list(rows)
    rounds = 1
    while have < target_bytes:
        rounds += 1
        for r in rows:
            out.append({**r, "id": f"{r['id']}@{rounds}", "source": f"{r['source']}@{rounds}"})
            have += int(r["bytes"])
            if have >= target_bytes:
                break
    return out, rounds


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


FIRST_RUN = """
import json, sys, time
from pathlib import Path
from refinery.tasks.encode import ShardsConfig, run_encode
files, tokenizer, out = [Path(p) for p in json.loads(sys.argv[1])], Path(sys.argv[2]), Path(sys.argv[3])
started = time.perf_counter()
result = run_encode(files, tokenizer, out, ShardsConfig(), progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "gate_seconds": result.metrics["gate_seconds"],
                  "encoder": result.extra["encoder"]}))
"""


def first_run(files: list[Path], tokenizer_file: Path, out: Path) -> dict[str, object]:
    """`run_encode` timed in a fresh Python process: what a command-line run of the stage pays."""
    proc = subprocess.run([sys.executable, "-c", FIRST_RUN, json.dumps([str(f) for f in files]), str(tokenizer_file),
                           str(out)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_rate(files: list[Path], seq_len: int = 1024, batch: int = 32, steps: int = 200) -> float:
    tw = TokenWindows(files, seq_len, seed=0)
    tw.get_batch(0, batch)
    seconds, _ = timed(lambda: [tw.get_batch(s, batch) for s in range(steps)])
    return steps * batch * (seq_len + 1) / seconds


def check_ids(stage: Path, files: list[str], tok, eot_id: int, texts: dict[str, str]) -> tuple[int, int]:  # noqa: ANN001
    """(documents whose shard ids equal `tokenizers` encode_batch plus end-of-text, documents checked)."""
    ids: list[str] = []
    tokens: list[np.ndarray] = []
    for name in files:
        i, t = read_shard(stage / name)
        ids += i
        tokens += t
    same = 0
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        encodings = tok.encode_batch([texts[d] for d in chunk])
        for enc, got in zip(encodings, tokens[start : start + 2000], strict=True):
            same += got.tolist() == [*enc.ids, eot_id]
    return same, len(ids)


def digests(stage: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}


def bench_training(train_mb: float, vocab_size: int) -> list[str]:
    """BpeTrainer against the fast trainer on the same texts in memory; the merges must be equal."""
    rows, rounds = repeated(build_corpus(int(train_mb * 1e6)), int(train_mb * 1e6))
    texts = [str(r["text"]) for r in rows]
    mb = sum(int(r["bytes"]) for r in rows) / 1e6
    print(f"training corpus: {len(texts)} documents, {mb:.1f} MB" + (f" (local text used {rounds}x)" if rounds > 1
                                                                      else ""))
    cfg = TokenizerConfig(vocab_size=vocab_size, special_tokens=[EOT])
    ref_s, reference = timed(lambda: train_bpe_reference([texts], cfg))
    fast_s, fast = timed(lambda: train_bpe_fast(texts, vocab_size, cfg.min_frequency, [EOT]))
    if fast is None:
        same = "fast trainer stepped aside (sample too small for the vocabulary)"
    else:
        ref_model, fast_model = json.loads(reference.to_str())["model"], json.loads(fast.to_str())["model"]
        equal = ref_model["merges"] == fast_model["merges"] and ref_model["vocab"] == fast_model["vocab"]
        same = f"same vocab and merges: {'yes' if equal else 'NO'} ({len(ref_model['merges'])} merges)"
    return [
        "",
        f"Tokenizer training, {mb:.1f} MB of text, vocab {vocab_size}, min_frequency {cfg.min_frequency}; {same}:",
        "",
        "| trainer | seconds | MB/s | speed-up |",
        "|---|---:|---:|---:|",
        f"| tokenizers BpeTrainer | {ref_s:.2f} | {mb / ref_s:.2f} | 1.00x |",
        f"| gigatoken train_bpe (Refinery's fast trainer, with its min_frequency check) | {fast_s:.2f} | "
        f"{mb / fast_s:.2f} | {ref_s / fast_s:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--train-mb", type=float, default=100.0, help="tokenizer training text in MB (0: skip)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the trained tokenizers")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="refinery-bench-") as tmp:
        root = Path(tmp)
        rows, rounds = repeated(build_corpus(int(args.mb * 1e6)), int(args.mb * 1e6))
        writer = PartWriter(root / "curated", schema=DOCUMENT_SCHEMA, rows_per_part=2000)  # several files, so datatrove can use one task per core
        for start in range(0, len(rows), 2000):
            writer.write(pa.Table.from_pylist(rows[start : start + 2000], schema=DOCUMENT_SCHEMA))
        writer.close()
        files = sorted((root / "curated").glob("part-*.parquet"))
        texts = [str(r["text"]) for r in rows]
        by_id = {str(r["id"]): str(r["text"]) for r in rows}
        mb = sum(int(r["bytes"]) for r in rows) / 1e6
        formats = sorted({str(r["format"]) for r in rows})
        print(f"corpus: {len(rows)} documents, {mb:.1f} MB, {len(files)} Parquet files, formats {formats}"
              + (f" (local text used {rounds}x)" if rounds > 1 else ""))

        train_s, tok_result = timed(lambda: run_train_tokenizer(
            files, root / "tokenizer", TokenizerConfig(vocab_size=args.vocab, sample_bytes=16 * 2**20),
            progress=False))
        tokenizer_file = root / "tokenizer" / "tokenizer.json"
        print(f"tokenizer: trained in {train_s:.1f} s by {tok_result.extra['trainer']}, "
              f"{tok_result.metrics['bytes_per_token']:.2f} bytes/token on val")

        tok, eot_id = load_tokenizer(tokenizer_file)
        fast = FastokensEncoder(tokenizer_file)
        giga = GigatokenEncoder(tokenizer_file)
        column = pa.array(texts, pa.large_string())
        giga.encode_arrow(column.slice(0, 1))  # its one-time imports, which the first-run row below counts
        results: list[tuple[str, float]] = []
        n = args.repeat
        seconds, _ = best_of(n, lambda i: len(tok.encode_batch(texts)))
        results.append(("ceiling: tokenizers encode_batch (in memory)", seconds))
        seconds, _ = best_of(n, lambda i: len([e.ids for e in tok.encode_batch(texts)]))
        results.append(("ceiling: encode_batch + ids (in memory)", seconds))
        seconds, _ = best_of(n, lambda i: len([e.ids for e in tok.encode_batch_fast(texts)]))
        results.append(("ceiling: encode_batch_fast + ids (in memory)", seconds))
        seconds, _ = best_of(n, lambda i: len(fast.encode_flat(texts)[0]))
        results.append(("fastokens encode_batch_flat, one call (in memory)", seconds))
        seconds, _ = best_of(n, lambda i: len(giga.encode_arrow(column)[0]))
        results.append(("gigatoken encode_batch from the Arrow column, one call (in memory)", seconds))

        # The first run comes first, each in a fresh process, before this one has warmed anything for it.
        firsts = [first_run(files, tokenizer_file, root / f"shards-first-{i}") for i in range(n)]
        fastest = min(firsts, key=lambda r: float(r["seconds"]))
        results.append((f"Refinery run_encode, Parquet -> shards, {fastest['encoder']} (in-process, first run in a "
                        f"fresh process: parity gate checked in {float(fastest['gate_seconds']):.2f} s, libraries "
                        "imported, tokenizers loaded)", float(fastest["seconds"])))

        checks: list[str] = []
        runs: dict[str, Path] = {}
        for encoder in ("auto", "fastokens", "tokenizers"):
            for workers in (1, 2):
                cfg = ShardsConfig(workers=workers, encoder=encoder)
                out = f"shards-{encoder}-{workers}"
                def stage(i: int, cfg: ShardsConfig = cfg, out: str = out) -> object:
                    return run_encode(files, tokenizer_file, root / f"{out}-{i}", cfg, progress=False)

                seconds, enc = best_of(n, stage)
                if encoder == "auto" and workers == 1:
                    auto = enc
                # Later runs in a process reuse the parity gate's verdict and the loaded tokenizers, as a
                # long-lived worker would; the fresh-process row above is what a command-line run pays.
                label = "in-process" if workers == 1 else f"{workers} worker processes"
                results.append((f"Refinery run_encode, Parquet -> shards, {enc.extra['encoder']} ({label})", seconds))
                runs[out] = root / f"{out}-0"
        runs["shards-first"] = root / "shards-first-0"
        enc_files = auto.extra["train_files"] + auto.extra["val_files"]
        same, total = check_ids(runs["shards-auto-1"], enc_files, tok, eot_id, by_id)
        checks.append(f"Ids: {same} of {total} documents in the {auto.extra['encoder']} shards equal tokenizers "
                      f"encode_batch + end-of-text.")
        identical = all(digests(runs[k]) == digests(runs["shards-tokenizers-1"]) for k in runs)
        checks.append(f"Shard files identical across encoders and worker counts: {'yes' if identical else 'NO'}.")
        train_files = [runs["shards-auto-2"] / f for f in auto.extra["train_files"]]

        for tasks in (1, 2):
            dt_runs = [run_datatrove(root / "curated", tokenizer_file, root / f"datatrove-{tasks}-{i}", tasks)
                       for i in range(n)]
            if None not in dt_runs:
                results.append((f"datatrove DocumentTokenizer, Parquet -> .ds ({tasks} task(s))", min(dt_runs)))

        rate = loader_rate(train_files)

    training = bench_training(args.train_mb, args.vocab) if args.train_mb > 0 else []

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
        lines.append(f"| {name} | {seconds:.2f} | {mb / seconds:.2f} | {ceiling / seconds:.2f}x | {vs_dt} |")
    lines += ["", *checks]
    lines += ["", f"Loader: {rate / 1e6:.0f} M tokens/s of windows (seq_len 1024, batch 32, TokenWindows.get_batch)."]
    lines += training
    table = "\n".join(lines)
    print(f"{table}\n\nMachine: {machine(*PACKAGES)}\n")
    if args.record:
        record(table, *PACKAGES)


if __name__ == "__main__":
    main()
