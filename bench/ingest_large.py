"""Ingest at real size: Refinery's ingest stage against datatrove's readers on big dataset files.

Generates, once per size (cached under bench/_work/ingest_large/):
- a Parquet file with >= 1 GB of text in several row groups (FineWeb-like columns: text, id, url,
  dump, language, language_score, token_count);
- a JSONL.zst file with >= 500 MB of text (text, id, url);
- a WARC.gz file with >= 300 MB of HTML (one response per page).
Each runs in its own child process through
- Refinery: `run_ingest` with `workers` processes (default: every core), then
- datatrove 0.10.1: ParquetReader / JsonlReader / WarcReader + Trafilatura, into its ParquetWriter,
  with as many tasks and workers as Refinery's workers, and at its defaults (1 task).
The table gives MB/s of text (input text bytes over wall time), the peak RSS of the largest
process of the run (the child or any worker it waited for), the documents out and the ratio to
datatrove. Every Parquet and JSONL record must come out as a document (checked); for WARC, pages
whose extraction leaves no text may differ between extractors, so both counts are shown.
Two sizes (`--sizes 1,4`) show that peak RSS does not grow with file size; `--scale` shrinks
everything for a quick check.

    python -m bench.ingest_large [--sizes 1,4] [--scale 1] [--workers N] [--only parquet,jsonl,warc] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "ingest_large"
BASE_MB = {"parquet": 1000, "jsonl": 500, "warc": 300}  # MB of text (HTML for WARC) at size 1
SUFFIX = {"parquet": "data.parquet", "jsonl": "data.jsonl.zst", "warc": "data.warc.gz"}
POOL = 20_000  # distinct documents, tiled to size (far apart, so compression can't exploit the repeats)


# -- generation ------------------------------------------------------------------------------


def _pool(seed: int = 0) -> list[str]:
    """Varied documents of 1-6 KB of pseudo-words in sentences and paragraphs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(2, 10, size=6000)]
    vocab = np.array(vocab)
    docs = []
    for i in range(POOL):
        n_words = int(rng.integers(150, 1000))
        words = vocab[rng.zipf(1.3, size=n_words) % len(vocab)]
        sentences = [" ".join(words[j:j + 14]).capitalize() + "." for j in range(0, n_words, 14)]
        paragraphs = ["\n".join([" ".join(sentences[k:k + 5])]) for k in range(0, len(sentences), 5)]
        docs.append(f"Document {i}.\n\n" + "\n\n".join(paragraphs))
    return docs


def _rows(text_mb: float) -> int:
    pool_bytes = sum(len(d.encode()) for d in _POOL_CACHE) / len(_POOL_CACHE)
    return max(1, int(text_mb * 1e6 / pool_bytes))


_POOL_CACHE: list[str] = []


def generate(kind: str, path: Path, text_mb: float) -> dict:
    """Write the input file of `kind` holding about `text_mb` MB of text; returns what it holds."""
    if not _POOL_CACHE:
        _POOL_CACHE.extend(_pool())
    rows = _rows(text_mb)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text_bytes = 0
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        chunk = 20_000
        schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string()), ("dump", pa.string()),
                            ("language", pa.string()), ("language_score", pa.float64()), ("token_count", pa.int64())])
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for start in range(0, rows, chunk):
                ids = range(start, min(rows, start + chunk))
                texts = [_POOL_CACHE[i % POOL] for i in ids]
                text_bytes += sum(len(t.encode()) for t in texts)
                w.write_table(pa.table({
                    "text": texts, "id": [f"<urn:uuid:{i:012d}>" for i in ids],
                    "url": [f"https://site{i % 997}.example.com/page/{i}" for i in ids],
                    "dump": ["CC-MAIN-2024-10"] * len(texts), "language": ["en"] * len(texts),
                    "language_score": [0.9 + (i % 10) / 100 for i in ids],
                    "token_count": [len(t) // 4 for t in texts]}, schema=schema), row_group_size=chunk // 4)
    elif kind == "jsonl":
        import orjson
        import zstandard

        with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as w:
            for i in range(rows):
                text = _POOL_CACHE[i % POOL]
                text_bytes += len(text.encode())
                w.write(orjson.dumps({"text": text, "id": str(i), "url": f"https://site{i % 997}.example.com/{i}"}))
                w.write(b"\n")
    else:
        import io

        from warcio.statusandheaders import StatusAndHeaders
        from warcio.warcwriter import WARCWriter

        with open(tmp, "wb") as f:
            writer = WARCWriter(f, gzip=True)
            for i in range(rows):
                body = _POOL_CACHE[i % POOL].split("\n\n")
                html = (f"<html><head><title>Page {i}</title></head><body><nav><a href='/'>Home</a></nav><main>"
                        + "".join(f"<p>{p}</p>" for p in body) + "</main><footer>Copyright</footer></body></html>")
                payload = html.encode()
                text_bytes += len(payload)
                headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(f"https://site{i % 997}.example.com/{i}", "response",
                                                              payload=io.BytesIO(payload), http_headers=headers))
    os.replace(tmp, path)
    info = {"records": rows, "text_bytes": text_bytes, "file_bytes": path.stat().st_size}
    path.with_name("info.json").write_text(json.dumps(info))
    return info


def ensure_input(kind: str, size: float, scale: float) -> tuple[Path, dict]:
    folder = WORK / f"{kind}-x{size:g}-s{scale:g}"
    path = folder / "in" / SUFFIX[kind]
    info_path = path.with_name("info.json")
    if path.exists() and info_path.exists():
        return path, json.loads(info_path.read_text())
    t = time.perf_counter()
    info = generate(kind, path, BASE_MB[kind] * size * scale)
    print(f"  generated {path.relative_to(HERE.parent)}: {info['text_bytes'] / 1e6:,.0f} MB of text, "
          f"{info['file_bytes'] / 1e6:,.0f} MB on disk, {info['records']:,} records "
          f"({time.perf_counter() - t:.0f}s)", flush=True)
    return path, info


# -- the runs (each in a child process) -------------------------------------------------------


class PeakRSS:
    """The largest peak RSS (VmHWM) of this process and every process under it, sampled while it runs.

    Not `getrusage`: a process started by fork + exec keeps the parent's `ru_maxrss` from before the
    exec (this benchmark's parent holds the generated text), and workers of a forkserver are not
    this process's children to wait for. VmHWM is reset by exec and read before each process exits.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                pass

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak


def child(spec: dict) -> dict:
    """One run, in this (child) process; returns seconds, documents out and peak RSS."""
    peak = PeakRSS()
    tool, kind, src, out, workers = spec["tool"], spec["kind"], Path(spec["src"]), Path(spec["out"]), spec["workers"]
    shutil.rmtree(out, ignore_errors=True)
    import pyarrow.parquet as pq

    t = time.perf_counter()
    if tool == "refinery":
        from refinery.storage.documents import document_files
        from refinery.tasks.ingest import IngestConfig, run_ingest

        result = run_ingest([str(src)], out, IngestConfig(workers=workers), progress=False)
        seconds = time.perf_counter() - t
        docs = sum(pq.ParquetFile(p).metadata.num_rows for p in document_files(out))
        dropped = dict(result.counts.dropped)
    else:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader, ParquetReader, WarcReader
        from datatrove.pipeline.writers import ParquetWriter

        folder = str(src.parent)
        if kind == "parquet":
            pipeline: list = [ParquetReader(folder, glob_pattern="*.parquet")]
        elif kind == "jsonl":
            pipeline = [JsonlReader(folder, glob_pattern="*.jsonl.zst")]
        else:
            from datatrove.pipeline.extractors import Trafilatura

            pipeline = [WarcReader(folder, glob_pattern="*.warc.gz"), Trafilatura()]
        pipeline.append(ParquetWriter(str(out / "docs")))
        tasks = spec.get("tasks", workers)
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=spec.get("dt_workers", tasks),
                              logging_dir=str(out / "logs")).run()
        seconds = time.perf_counter() - t
        docs = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "docs").rglob("*.parquet"))
        dropped = {}
    rss = peak.stop()
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "docs": docs, "rss_mb": rss / 2**20, "dropped": dropped}


def datatrove_missing(kind: str) -> str | None:
    """What datatrove's reader for `kind` needs and this environment lacks, if anything."""
    if kind != "warc":
        return None
    import importlib.util

    missing = [pkg for mod, pkg in (("cchardet", "faust-cchardet"), ("magic", "python-magic"))
               if importlib.util.find_spec(mod) is None]
    return f"needs `pip install {' '.join(missing)}`" if missing else None


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.ingest_large", "--child", json.dumps(spec)],
                          cwd=HERE.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['tool']} on {spec['kind']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="multiples of the base sizes (1 GB Parquet, 500 MB JSONL, 300 MB WARC)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every size (0.01 for a quick check)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Refinery workers = datatrove tasks")
    ap.add_argument("--only", default="parquet,jsonl,warc", help="which inputs")
    ap.add_argument("--no-defaults", action="store_true", help="skip datatrove at its defaults (1 task)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    sizes = [float(s) for s in args.sizes.split(",")]
    kinds = [k for k in ("parquet", "jsonl", "warc") if k in args.only.split(",")]
    w = args.workers
    lines = ["| input | text MB | tool | seconds | MB/s of text | peak RSS MB | docs out | Refinery vs this |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    failures = []
    for kind in kinds:
        for size in sizes:
            src, info = ensure_input(kind, size, args.scale)
            mb = info["text_bytes"] / 1e6
            runs = [("refinery", f"Refinery run_ingest ({w} workers)", {})]
            runs.append(("datatrove", f"datatrove ({w} tasks, {w} workers)", {"tasks": w}))
            if not args.no_defaults and w != 1:
                runs.append(("datatrove", "datatrove (defaults: 1 task)", {"tasks": 1, "dt_workers": -1}))
            results = []
            missing = datatrove_missing(kind)
            if missing is not None:
                runs = runs[:1]
            for tool, label, extra in runs:
                spec = {"tool": tool, "kind": kind, "src": str(src), "out": str(src.parent.parent / f"out-{tool}"),
                        "workers": w, **extra}
                r = run_child(spec)
                results.append((label, r))
                print(f"  {kind} x{size:g} {label}: {r['seconds']:.1f}s {mb / r['seconds']:.1f} MB/s "
                      f"rss {r['rss_mb']:.0f} MB docs {r['docs']:,} {r['dropped'] or ''}", flush=True)
            ref = results[0][1]
            if kind != "warc" and ref["docs"] != info["records"]:
                failures.append(f"{kind} x{size:g}: Refinery wrote {ref['docs']:,} of {info['records']:,} records")
            for label, r in results:
                ratio = r["seconds"] / ref["seconds"]
                lines.append(f"| {kind} x{size:g} | {mb:,.0f} | {label} | {r['seconds']:.1f} | {mb / r['seconds']:.1f} | "
                             f"{r['rss_mb']:,.0f} | {r['docs']:,} | {ratio:.2f}x |")
            if missing is not None:
                lines.append(f"| {kind} x{size:g} | {mb:,.0f} | datatrove | n/a: its WarcReader {missing} | | | | |")
    table = "\n".join(lines)
    print()
    print(table)
    for f in failures:
        print("CHECK FAILED:", f)
    if args.record and not failures:
        from bench.common import record

        cmd = "python -m bench.ingest_large " + " ".join(sys.argv[1:])
        record(f"## ingest at real size ({time.strftime('%Y-%m-%d')})\n\n`{cmd}`\n\n{table}",
               "pyarrow", "datatrove", "fastwarc", "trafilatura", "resiliparse")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
