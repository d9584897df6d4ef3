"""HTML main-text extractors compared on a held-out set, and WARC throughput against datatrove.

Part 1, quality and speed of HTML-to-text on `tests/data/html_heldout` (100 pages of the
Zyte/Scrapinghub article-extraction benchmark, each with its annotated article body):
- `heuristic`: Refinery's earlier lxml rules;
- `trafilatura (defaults)`: `trafilatura.extract(html)`;
- `trafilatura (FineWeb)`: `favor_precision=True, include_comments=False, deduplicate=True`
  (the duplicate cache is trafilatura's process-wide one, as in FineWeb's runs);
- `trafilatura (Refinery)`: the same without `deduplicate` (Refinery's `trafilatura` extractor),
  and the same with `fast=True` (trafilatura's readability/jusText fallbacks off);
- `resiliparse main content`: `extract_plain_text(tree, main_content=True)` (Dolma's).
Every extractor gets the same decoded markup (Refinery's `decode_html`), so the table compares
extraction. Scores are bag-of-words: precision = shared words / extracted words, recall =
shared words / true words, with words as `\\w+` runs, lower-cased, counted with multiplicity;
precision and recall are averaged over pages and F1 is taken of the two averages (the
benchmark's own convention), next to the mean of per-page F1. Speed: pages/s and MB/s of HTML.

Part 2, WARC throughput: a generated WARC.gz (held-out pages under fresh URLs, each response
preceded by its request record) read end to end, MB/s of HTML payload in and of text out:
- Refinery: `read_warc_stream` (FastWARC) + the configured extractor, over the open file;
- datatrove: its WARC record processing (`process_record`, warcio) feeding its `Trafilatura`
  extractor (FineWeb's settings, run in datatrove's sandbox process as in its pipelines), with
  `deduplicate=False` because the generated file repeats pages (see `datatrove_warc`).
datatrove's reader imports `cchardet` and `python-magic`; when they are not installed a
stand-in `cchardet.detect` backed by uchardet (through Resiliparse) is supplied, and `magic`
is never consulted because every generated record carries `WARC-Identified-Payload-Type`.

    python -m bench.html_extract [--warc-mb 20] [--repeat 1] [--record]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELDOUT = HERE.parent / "tests" / "data" / "html_heldout"
WORK = HERE / "_work" / "html_extract"
_WORD = re.compile(r"\w+")


# -- the held-out set and its scores ----------------------------------------------------------------------

def load_heldout(root: Path = HELDOUT) -> list[tuple[str, bytes, str]]:
    """(page key, raw HTML bytes, annotated main text) of every held-out page, in key order."""
    truth = json.loads(gzip.decompress((root / "ground-truth.json.gz").read_bytes()))
    return [(key, gzip.decompress((root / "html" / f"{key}.html.gz").read_bytes()), truth[key]["articleBody"])
            for key in sorted(truth)]


def word_scores(true: str, pred: str) -> tuple[float, float]:
    """(precision, recall) of the extracted words against the true ones, as multisets."""
    t, p = Counter(_WORD.findall(true.lower())), Counter(_WORD.findall(pred.lower()))
    shared = sum((t & p).values())
    n_true, n_pred = sum(t.values()), sum(p.values())
    precision = shared / n_pred if n_pred else float(n_true == 0)
    recall = shared / n_true if n_true else 1.0
    return precision, recall


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def extractors() -> dict[str, Callable[[str], str]]:
    """Name -> markup-to-text function, for every extractor compared."""
    import trafilatura

    from refinery.tasks.ingest.formats.html import markup_to_text

    return {
        "heuristic (Refinery's earlier rules)": lambda m: markup_to_text(m, "heuristic")[0],
        "trafilatura (defaults)": lambda m: trafilatura.extract(m) or "",
        "trafilatura (FineWeb settings)": lambda m: trafilatura.extract(
            m, favor_precision=True, include_comments=False, deduplicate=True) or "",
        "trafilatura (Refinery: FineWeb's, no deduplicate)": lambda m: markup_to_text(m, "trafilatura")[0],
        "trafilatura (Refinery's, fast=True: no fallback extractors)": lambda m: trafilatura.extract(
            m, favor_precision=True, include_comments=False, fast=True) or "",
        "resiliparse main content": lambda m: markup_to_text(m, "resiliparse")[0],
    }


def compare(pages: list[tuple[str, bytes, str]], repeat: int) -> list[dict]:
    """Quality and speed of each extractor on the held-out pages (best of `repeat` timings)."""
    from trafilatura.deduplication import LRU_TEST

    from refinery.tasks.ingest.formats.html import decode_html

    html_bytes = sum(len(raw) for _, raw, _ in pages)
    rows = []
    for name, extract in extractors().items():
        extract(decode_html(pages[0][1]))  # imports, caches
        best = float("inf")
        for _ in range(repeat):
            # FineWeb's `deduplicate=True` counts segments in a process-wide cache: start each pass
            # empty, so that a page is not dropped for having been seen in the previous pass.
            LRU_TEST.clear()
            start = time.perf_counter()
            outputs = [extract(decode_html(raw)) for _, raw, _ in pages]
            best = min(best, time.perf_counter() - start)
        scores = [word_scores(true, out) for (_, _, true), out in zip(pages, outputs, strict=True)]
        precision = sum(p for p, _ in scores) / len(scores)
        recall = sum(r for _, r in scores) / len(scores)
        rows.append({
            "name": name, "precision": precision, "recall": recall, "f1": f1(precision, recall),
            "page_f1": sum(f1(p, r) for p, r in scores) / len(scores),
            "empty": sum(not out.strip() for out in outputs),
            "pages_s": len(pages) / best, "mb_s": html_bytes / best / 1e6,
        })
    return rows


# -- WARC throughput ----------------------------------------------------------------------------------------

def build_warc(path: Path, pages: list[tuple[str, bytes, str]], target_mb: float) -> tuple[int, int]:
    """A WARC.gz of about `target_mb` MB: each page as a response under a fresh URL, after its request.

    Returns (responses, HTML payload bytes)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    n = payload = 0
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        while f.tell() < target_mb * 1e6:
            key, raw, _ = pages[n % len(pages)]
            url = f"https://example.org/{n}/{key[:16]}.html"
            request = StatusAndHeaders(f"GET /{n}/{key[:16]}.html HTTP/1.1", [("Host", "example.org")],
                                       is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(raw), http_headers=headers)
            record.rec_headers.add_header("WARC-Identified-Payload-Type", "text/html")
            writer.write_record(record)
            n += 1
            payload += len(raw)
    return n, payload


def refinery_warc(path: Path, extractor: str) -> tuple[int, int]:
    """(documents, text characters) from Refinery's reader over the open file."""
    from refinery.tasks.ingest.base import Context, Doc
    from refinery.tasks.ingest.config import IngestConfig
    from refinery.tasks.ingest.formats.warc import read_warc_stream

    # The settings with `html_extractor` set, whether or not IngestConfig declares that key yet.
    cfg = types.SimpleNamespace(**{**IngestConfig().model_dump(), "html_extractor": extractor})
    ctx = Context(cfg, time.monotonic() + 3600)  # type: ignore[arg-type]
    docs = chars = 0
    with open(path, "rb") as f:
        for item in read_warc_stream(path.name, f, ctx):
            if isinstance(item, Doc):
                docs += 1
                chars += len(item.text)
    return docs, chars


def records_only(path: Path, reader: str) -> tuple[int, int]:
    """(responses, payload bytes) read without extraction: the cost of the WARC reader alone."""
    responses = 0
    with open(path, "rb") as f:
        if reader == "fastwarc":
            from fastwarc.warc import ArchiveIterator, WarcRecordType

            for record in ArchiveIterator(f, record_types=WarcRecordType.response, auto_decode="all"):
                responses += 1
                record.reader.read()
        else:
            from warcio.archiveiterator import ArchiveIterator as WarcioIterator

            for record in WarcioIterator(f):
                if record.rec_type == "response":
                    responses += 1
                    record.content_stream().read()
    return responses, 0


def _datatrove_shims() -> None:
    """Stand-ins for datatrove's `cchardet`/`magic` imports when those packages are absent."""
    try:
        import cchardet  # noqa: F401
    except ImportError:
        from resiliparse.parse.encoding import detect_encoding

        sys.modules["cchardet"] = types.SimpleNamespace(detect=lambda data: {"encoding": detect_encoding(data)})
    try:
        import magic  # noqa: F401
    except ImportError:
        def _no_magic(*args: object, **kwargs: object) -> str:
            raise RuntimeError("python-magic is not installed; records should carry their payload type")

        sys.modules["magic"] = types.SimpleNamespace(from_buffer=_no_magic)


def datatrove_warc(path: Path) -> tuple[int, int]:
    """(documents, text characters) from datatrove's WARC record processing + Trafilatura step."""
    _datatrove_shims()
    from datatrove.data import Document
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers.warc import process_record
    from warcio.archiveiterator import ArchiveIterator

    def documents() -> Iterator[Document]:
        with open(path, "rb") as f:
            for ri, record in enumerate(ArchiveIterator(f)):
                data = process_record(record)
                if data:
                    yield Document(text=data.pop("text"), id=f"{path.name}/{ri}", metadata=data)

    docs = chars = 0
    # deduplicate=False: the generated WARC repeats the held-out pages, which trafilatura's
    # process-wide duplicate cache would drop after two sightings; both sides do the same work.
    for doc in Trafilatura(favour_precision=True, deduplicate=False, timeout=10).run(documents()):
        docs += 1
        chars += len(doc.text)
    return docs, chars


def warc_throughput(pages: list[tuple[str, bytes, str]], target_mb: float) -> tuple[str, list[dict]]:
    path = WORK / "crawl.warc.gz"
    n, payload = build_warc(path, pages, target_mb)
    size = path.stat().st_size
    runs = {
        "records only: FastWARC (Refinery's reader)": lambda: records_only(path, "fastwarc"),
        "records only: warcio (the earlier reader, datatrove's)": lambda: records_only(path, "warcio"),
        "Refinery: FastWARC + earlier lxml rules": lambda: refinery_warc(path, "heuristic"),
        "Refinery: FastWARC + resiliparse main content": lambda: refinery_warc(path, "resiliparse"),
        "Refinery: FastWARC + trafilatura (default extractor)": lambda: refinery_warc(path, "trafilatura"),
        "datatrove: WarcReader records + Trafilatura": lambda: datatrove_warc(path),
    }
    rows = []
    for name, run in runs.items():
        start = time.perf_counter()
        docs, chars = run()
        seconds = time.perf_counter() - start
        rows.append({"name": name, "docs": docs, "seconds": seconds, "html_mb_s": payload / seconds / 1e6,
                     "text_mb_s": chars / seconds / 1e6})
    what = f"{size / 1e6:.1f} MB WARC.gz, {n} responses + {n} requests, {payload / 1e6:.1f} MB of HTML"
    return what, rows


# -- report -------------------------------------------------------------------------------------------------

def tables(pages: list[tuple[str, bytes, str]], quality: list[dict], warc_what: str, warc: list[dict]) -> str:
    mb = sum(len(raw) for _, raw, _ in pages) / 1e6
    lines = [
        f"### html_extract: {len(pages)} held-out pages ({mb:.1f} MB of HTML), word-level scores against the "
        "annotated article body",
        "",
        "| extractor | precision | recall | F1 | mean page F1 | empty | pages/s | MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in quality:
        lines.append(f"| {r['name']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['page_f1']:.3f} "
                     f"| {r['empty']} | {r['pages_s']:.1f} | {r['mb_s']:.2f} |")
    lines += ["", f"WARC throughput: {warc_what}, one process (datatrove's extractor in its sandbox process)", "",
              "| reader + extractor | documents | seconds | MB/s of HTML | MB/s of text | ratio |",
              "|---|---:|---:|---:|---:|---:|"]
    peer = warc[-1]["seconds"]
    for r in warc:
        text_mb_s = f"{r['text_mb_s']:.3f}" if r["text_mb_s"] else "n/a"
        lines.append(f"| {r['name']} | {r['docs']} | {r['seconds']:.1f} | {r['html_mb_s']:.2f} | {text_mb_s} "
                     f"| {peer / r['seconds']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--warc-mb", type=float, default=20.0, help="size of the generated WARC.gz (MB)")
    ap.add_argument("--pages", type=int, default=0, help="use only the first N held-out pages (0: all)")
    ap.add_argument("--repeat", type=int, default=1, help="timings per extractor on the held-out set (best kept)")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    pages = load_heldout()
    if args.pages:
        pages = pages[: args.pages]
    quality = compare(pages, args.repeat)
    warc_what, warc = warc_throughput(pages, args.warc_mb)
    text = tables(pages, quality, warc_what, warc)
    print(text)
    if args.record:
        from bench.common import record

        record(text, "trafilatura", "resiliparse", "fastwarc", "datatrove", "warcio", "lxml")


if __name__ == "__main__":
    main()
