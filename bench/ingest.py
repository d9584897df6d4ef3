"""Ingest benchmark: Refinery's ingest stage against a plain loop of `unstructured`'s `partition`.

Both read the same generated corpus (one folder per format) in one process run:
- Refinery: `run_ingest` over each format's folder, in-process (`workers=1`) and through
  a warm 2-process executor (what the flow's task runner passes);
- peer: `for f in files: partition(filename=f)`, element texts joined by blank lines.
Both are warmed up on one file per format first (imports, model loading). The table
gives files/s and MB/s per format, the speed ratio, and how much of the peer's text
Refinery extracted (character-level similarity of whitespace-normalised text, and the
ratio of extracted characters). PDF and images need `unstructured[pdf]`/`[image]`,
which pull a CUDA torch and download layout models, so the peer column reads n/a there.

    python -m bench.ingest [--files 40] [--record]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import json
import multiprocessing
import random
import shutil
import sys
import time
from concurrent.futures import Executor
from pathlib import Path

from bench.common import record

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "ingest"

WORDS = ("data pipeline model token corpus filter shard train document quality language web page archive "
         "refinery clean dedup signal batch stage manifest lineage metric table text source crawl parse "
         "the a of and to in is that for it as with was on be by this are from at or an which").split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))


def build_corpus(root: Path, n: int, seed: int = 0) -> dict[str, list[Path]]:
    """n files per format, with realistic sizes (a few KB to a few tens of KB)."""
    import docx
    from fpdf import FPDF
    from pptx import Presentation

    rng = random.Random(seed)
    if root.exists():
        shutil.rmtree(root)
    out: dict[str, list[Path]] = {}

    def add(fmt: str, name: str, data: bytes | None = None) -> Path:
        path = root / fmt / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        out.setdefault(fmt, []).append(path)
        return path

    for i in range(n):
        paras = [paragraph(rng) for _ in range(rng.randint(10, 30))]
        add("text", f"doc{i}.txt", "\n\n".join(paras).encode())
        add("markdown", f"doc{i}.md", ("# " + sentence(rng) + "\n\n" + "\n\n".join(
            (f"## {sentence(rng)}\n\n" if j % 4 == 0 else "") + p for j, p in enumerate(paras))).encode())
        funcs = "\n\n".join(f"def func_{j}(x):\n    \"\"\"{sentence(rng)}\"\"\"\n    return x * {j}\n" for j in range(40))
        add("code", f"mod{i}.py", funcs.encode())
        nav = "<nav><ul>" + "".join(f"<li><a href='/{w}'>{w}</a></li>" for w in WORDS[:12]) + "</ul></nav>"
        body = "".join(f"<h2>{sentence(rng)}</h2>" if j % 5 == 0 else f"<p>{p}</p>" for j, p in enumerate(paras))
        html = (f"<html><head><title>Page {i}</title><script>var t={i};</script><style>p{{}}</style></head>"
                f"<body>{nav}<main>{body}</main><footer>Copyright {i}</footer></body></html>")
        add("html", f"page{i}.html", html.encode())
        d = docx.Document()
        d.add_heading(sentence(rng), 0)
        for p in paras:
            d.add_paragraph(p)
        d.save(str(add("docx", f"doc{i}.docx")))
        prs = Presentation()
        for p in paras[:6]:
            slide = prs.slides.add_slide(prs.slide_layouts[1])
            slide.shapes.title.text = sentence(rng)
            slide.placeholders[1].text = p
        prs.save(str(add("pptx", f"deck{i}.pptx")))
        pdf = FPDF()
        pdf.set_font("helvetica", size=11)
        for p in paras[:9]:
            if pdf.page_no() == 0 or rng.random() < 0.3:
                pdf.add_page()
            pdf.multi_cell(0, 6, p, new_x="LMARGIN", new_y="NEXT")
        pdf.output(str(add("pdf", f"doc{i}.pdf")))
        rows = "\n".join(json.dumps({"text": p, "id": f"{i}-{j}"}) for j, p in enumerate(paras))
        add("jsonl", f"data{i}.jsonl", rows.encode())
    return out


def normalise(text: str) -> str:
    return " ".join(text.split())


def similarity(a: str, b: str, cap: int = 20_000) -> float:
    a, b = normalise(a)[:cap], normalise(b)[:cap]
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def clear_nlp_caches() -> None:
    """unstructured memoises spaCy results per string: a second pass over the same text would be free."""
    from unstructured.nlp import tokenize

    for name in ("_process_cached", "_tokenize_for_cache", "word_tokenize", "pos_tag"):
        getattr(tokenize, name).cache_clear()


def run_peer(files: list[Path]) -> tuple[float, dict[Path, str] | None]:
    from unstructured.partition.auto import partition

    clear_nlp_caches()
    texts: dict[Path, str] = {}
    t0 = time.perf_counter()
    try:
        for f in files:
            texts[f] = "\n\n".join(e.text for e in partition(filename=str(f)) if e.text)
    except ImportError:  # partition_pdf / partition_image need extras we don't install
        return float("nan"), None
    return time.perf_counter() - t0, texts


def run_pdfminer(files: list[Path]) -> tuple[float, dict[Path, str]]:
    """The text-layer library under unstructured[pdf]'s fast strategy: a reference for PDF text."""
    from pdfminer.high_level import extract_text

    t0 = time.perf_counter()
    texts = {f: extract_text(str(f)) for f in files}
    return time.perf_counter() - t0, texts


def run_refinery(folder: Path, stage: Path, workers: int, batch_files: int = 64,
                 executor: Executor | None = None) -> tuple[float, dict[str, str]]:
    from refinery.storage.documents import document_files, read_table
    from refinery.tasks.ingest import IngestConfig, run_ingest

    if stage.exists():
        shutil.rmtree(stage)
    t0 = time.perf_counter()
    run_ingest([str(folder)], stage, IngestConfig(workers=workers, batch_files=batch_files), progress=False,
               executor=executor)
    elapsed = time.perf_counter() - t0
    by_file: dict[str, list[str]] = {}
    for row in read_table(document_files(stage), columns=["source", "text"]).to_pylist():
        by_file.setdefault(row["source"].split("#")[0], []).append(row["text"])
    return elapsed, {k: "\n\n".join(v) for k, v in by_file.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=40, help="files per format")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()

    from refinery.tasks.ingest import use_offline_nlp
    from refinery.tasks.ingest.sources import local_uri

    use_offline_nlp()
    corpus = build_corpus(WORK / "corpus", args.files)
    warm = WORK / "warm"
    # A long-lived pool, as the flow's task runner would pass: its start-up is not timed.
    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    for fmt, files in corpus.items():  # warm both sides: imports, parsers, spaCy pipeline
        run_refinery(files[0].parent, warm / fmt, workers=1)
        run_refinery(files[0].parent, warm / (fmt + "-pool"), workers=1, batch_files=1, executor=pool)
        run_peer(files[:1])

    rows = []
    tot = {"n": 0, "mb": 0.0, "ref": 0.0, "pool": 0.0, "peer": 0.0}
    for fmt, files in corpus.items():
        mb = sum(f.stat().st_size for f in files) / 1e6
        t_ref, ref_texts = run_refinery(files[0].parent, WORK / "stage" / fmt, workers=1)
        t_pool, _ = run_refinery(files[0].parent, WORK / "stage" / fmt, workers=1,
                                 batch_files=max(1, len(files) // 8), executor=pool)
        t_peer, peer_texts = run_peer(files)
        label = fmt
        if peer_texts is None and fmt == "pdf":
            t_ref_peer, ref_peer_texts = run_pdfminer(files)
            label = f"pdf (peer: pdfminer.six, {len(files) / t_ref_peer:.1f} files/s; not in overall)"
        else:
            ref_peer_texts = peer_texts
        if ref_peer_texts is not None and fmt != "jsonl":  # the peer reads JSONL as raw JSON, not records
            sims = [similarity(ref_texts.get(local_uri(str(f)), ""), ref_peer_texts[f]) for f in files]
            ref_chars = sum(len(normalise(ref_texts.get(local_uri(str(f)), ""))) for f in files)
            peer_chars = sum(len(normalise(t)) for t in ref_peer_texts.values())
            sim, chars = f"{sum(sims) / len(sims):.3f}", f"{ref_chars / max(peer_chars, 1):.2f}"
        else:
            sim = chars = "n/a"
        if peer_texts is not None:
            tot["n"] += len(files)
            tot["mb"] += mb
            tot["ref"] += t_ref
            tot["pool"] += t_pool
            tot["peer"] += t_peer
        peer_fps = f"{len(files) / t_peer:.1f}" if peer_texts is not None else "n/a"
        ratio = f"{t_peer / t_ref:.1f}x" if peer_texts is not None else "n/a"
        rows.append(f"| {label} | {len(files)} | {mb:.1f} | {len(files) / t_ref:.1f} | {mb / t_ref:.2f} | "
                    f"{len(files) / t_pool:.1f} | {peer_fps} | {ratio} | {sim} | {chars} |")
    rows.append(f"| **overall (formats both read)** | {tot['n']} | {tot['mb']:.1f} | {tot['n'] / tot['ref']:.1f} | "
                f"{tot['mb'] / tot['ref']:.2f} | {tot['n'] / tot['pool']:.1f} | {tot['n'] / tot['peer']:.1f} | "
                f"**{tot['peer'] / tot['ref']:.1f}x** | | |")
    header = [
        "| format | files | MB | Refinery files/s | Refinery MB/s | Refinery files/s (2-process executor) | "
        "unstructured files/s | speed-up (1 proc) | text similarity | chars Refinery/peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pool.shutdown()
    table = "\n".join(header + rows)
    print(table)
    if args.record:
        record(f"## ingest ({time.strftime('%Y-%m-%d')})\n\n{table}", "unstructured", "pyarrow")


if __name__ == "__main__":
    sys.exit(main())
