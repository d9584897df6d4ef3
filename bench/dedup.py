"""Near-duplicate benchmark with ground truth: Refinery's dedup stage vs datatrove's and rensa's MinHash.

Documents are built from real English text (the Python reference documentation that ships with CPython,
`pydoc_data.topics`): each base document is a random run of its sentences. Half of them get an edited copy
(word substitutions, deletions and insertions at a random rate), whose true Jaccard similarity to its
original (word 5-shingles, lower-cased words) is computed exactly. A copy at or above the threshold is a
duplicate that should be removed; one below it should be kept.

All systems use 5-word shingles and the same bands x rows (14 x 8 by default, num_perm = bands x rows),
and each runs in a child process so its peak memory (max RSS) is its own:
- `refinery`: the dedup stage (numpy MinHash, bit-identical to datasketch; exact Jaccard check);
- `refinery+rensa`: the same stage with `minhash_backend="rensa"` (rensa's R-MinHash on the same shingles);
- `datatrove`: its four-step MinHash pipeline;
- `rensa`: rensa alone, `RMinHashDeduplicator` fed the same normalised word 5-grams as strings (it keeps
  the first of each group and checks candidates by estimated, not exact, similarity).
"signatures docs/s" times texts -> signature matrix alone (normalise, shingle, sign) for the systems whose
signing can be called on its own; "dedup docs/s" is the whole run. Prints a markdown table; `--record`
appends it to bench/RESULTS.md with a machine description.

    python -m bench.dedup [--docs 4000] [--workers 2] [--record]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import random
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from bench.common import record

THRESHOLD = 0.8
WORD = re.compile(r"\w+")


def sentences() -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 400]
    return sorted(set(out))


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = WORD.findall(text.lower())
    return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    out = []
    for w in text.split(" "):
        r = rng.random()
        if r < rate / 3:
            continue  # deletion
        if r < 2 * rate / 3:
            out.append(rng.choice(vocab))  # substitution
            continue
        out.append(w)
        if r < rate:
            out.append(rng.choice(vocab))  # insertion
    return " ".join(out)


def make_corpus(n_docs: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, str, float]]]:
    rng = random.Random(seed)
    pool = sentences()
    vocab = sorted({w for s in pool[:2000] for w in s.split()})
    base = [" ".join(rng.sample(pool, rng.randint(10, 18))) for _ in range(n_docs)]
    docs = [{"id": f"b{i:06d}", "text": t} for i, t in enumerate(base)]
    pairs = []
    for i in range(0, n_docs, 2):
        copy = edit(base[i], rng.uniform(0.0, 0.05), rng, vocab)
        docs.append({"id": f"c{i:06d}", "text": copy})
        pairs.append((f"b{i:06d}", f"c{i:06d}", jaccard(base[i], copy)))
    return docs, pairs


def score(removed: set[str], pairs: list[tuple[str, str, float]]) -> dict[str, float]:
    in_pair = {}
    for a, b, j in pairs:
        in_pair[a] = in_pair[b] = (a, b, j)
    tp = fn = 0
    for a, b, j in pairs:
        hit = a in removed or b in removed
        if j >= THRESHOLD:
            tp += hit
            fn += not hit
    fp = sum(1 for d in removed if d not in in_pair or in_pair[d][2] < THRESHOLD)
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


NORMALIZE = {"fold_digits": True, "strip_accents": True}


def run_refinery(docs: list[dict], work: Path, bands: int, rows: int, workers: int, backend: str = "numpy") -> set[str]:
    from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, read_table
    from refinery.tasks.dedup import DedupConfig, run_dedup

    rows_ = [{"id": d["id"], "text": d["text"], "source": d["id"], "format": "text", "bytes": len(d["text"]), "meta": "{}"}
             for d in docs]
    writer = PartWriter(work / "in", DOCUMENT_SCHEMA)
    writer.write(rows_)
    writer.close()
    files = sorted((work / "in").glob("part-*.parquet"))
    cfg = DedupConfig(bands=bands, rows=rows, num_perm=bands * rows, threshold=THRESHOLD, batch_size=1000,
                      normalize=NORMALIZE, minhash_backend=backend)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        run_dedup(files, work / "dedup", cfg, progress=False, executor=pool)
    finally:
        if pool:
            pool.shutdown()
    return set(read_table([work / "dedup" / "dropped.parquet"]).column("id").to_pylist())


def run_datatrove(docs: list[dict], work: Path, bands: int, rows: int, workers: int) -> set[str]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    src = work / "src"
    src.mkdir(parents=True)
    tasks = max(workers, 1)
    for t in range(tasks):  # one file per task, in order, so "first" means the same as for Refinery
        part = docs[t * len(docs) // tasks : (t + 1) * len(docs) // tasks]
        with open(src / f"{t:02d}.jsonl", "w") as f:
            for d in part:
                f.write(json.dumps(d) + "\n")
    cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows, hash_config=HashConfig(precision=64, hash_fc="sha1"))
    log = str(work / "logs")
    common = {"logging_dir": None, "skip_completed": False}
    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(src)), MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg)],
        tasks=tasks, workers=workers, **{**common, "logging_dir": log + "/1"},
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg)],
        tasks=bands, workers=workers, **{**common, "logging_dir": log + "/2"},
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg)],
        tasks=1, **{**common, "logging_dir": log + "/3"},
    ).run()
    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(src)), MinhashDedupFilter(input_folder=str(work / "remove")),
                  JsonlWriter(str(work / "out"), compression=None)],
        tasks=tasks, workers=workers, **{**common, "logging_dir": log + "/4"},
    ).run()
    kept = set()
    for p in (work / "out").glob("*.jsonl"):
        for line in p.read_text().splitlines():
            kept.add(json.loads(line)["id"])
    return {d["id"] for d in docs} - kept


def rensa_shingles(texts: list[str]) -> list[list[str]]:
    """Refinery's normalised words, as word 5-gram strings (one shingle of all words for a shorter text)."""
    from refinery.tasks.normalize import NormalizeConfig, normalize_words

    out = []
    for w in normalize_words(texts, NormalizeConfig(**NORMALIZE)).to_pylist():
        out.append([" ".join(w[i : i + 5]) for i in range(max(len(w) - 4, 1))] if w else [])
    return out


def run_rensa(docs: list[dict], work: Path, bands: int, rows: int, workers: int) -> set[str]:
    from rensa import RMinHashDeduplicator

    dedup = RMinHashDeduplicator(threshold=THRESHOLD, num_perm=bands * rows, use_lsh=True, num_bands=bands, seed=1)
    keep = dedup.add_pairs(zip([d["id"] for d in docs], rensa_shingles([d["text"] for d in docs]), strict=True))
    return {d["id"] for d, k in zip(docs, keep, strict=True) if not k}


def sign_only(name: str, texts: list[str], num_perm: int) -> None:
    """Texts -> signature matrix, nothing else: the part a MinHash backend changes."""
    if name == "rensa":
        from rensa import RMinHash

        RMinHash.digest_matrix_from_token_sets(rensa_shingles(texts), num_perm, 1).to_rows()
        return
    from refinery.tasks.dedup import DedupConfig, signature_batch

    cfg = DedupConfig(num_perm=num_perm, bands=1, rows=num_perm, normalize=NORMALIZE,
                      minhash_backend="rensa" if name == "refinery+rensa" else "numpy")
    for i in range(0, len(texts), 1000):
        batch = texts[i : i + 1000]
        signature_batch(pa.array(batch, pa.large_string()), [None] * len(batch), cfg)


SYSTEMS = {
    "refinery": run_refinery,
    "refinery+rensa": functools.partial(run_refinery, backend="rensa"),
    "datatrove": run_datatrove,
    "rensa": run_rensa,
}


def _child(name: str, docs: list[dict], bands: int, rows: int, workers: int, q: mp.Queue) -> None:
    fn = SYSTEMS[name]
    with tempfile.TemporaryDirectory() as tmp:  # warm-up on a few documents: imports and model loading
        fn(docs[:20], Path(tmp), bands, rows, workers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        removed = fn(docs, Path(tmp), bands, rows, workers)
        elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sign_seconds = None
    if name != "datatrove":  # datatrove signs inside its pipeline step; there is no call for it alone
        texts = [d["text"] for d in docs]
        sign_only(name, texts[:20], bands * rows)
        t0 = time.perf_counter()
        sign_only(name, texts, bands * rows)
        sign_seconds = time.perf_counter() - t0
    q.put({"removed": sorted(removed), "seconds": elapsed, "sign_seconds": sign_seconds, "peak_mb": peak})


def measure(name: str, docs: list[dict], bands: int, rows: int, workers: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, docs, bands, rows, workers, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=4000, help="base documents (half get an edited copy)")
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    docs, pairs = make_corpus(args.docs)
    n = len(docs)
    above = sum(j >= THRESHOLD for *_, j in pairs)
    results = {name: measure(name, docs, args.bands, args.rows, args.workers) for name in SYSTEMS}
    scores = {name: score(set(r["removed"]), pairs) for name, r in results.items()}
    lines = [
        f"### dedup: {n} documents ({len(pairs)} edited copies, {above} at Jaccard >= {THRESHOLD}), "
        f"5-shingles, {args.bands}x{args.rows} bands, {args.workers} workers",
        "",
        "| system | precision | recall | F1 | signatures docs/s | dedup docs/s | peak RSS MB | removed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = scores[name]
        sign = f"{n / r['sign_seconds']:,.0f}" if r["sign_seconds"] else "n/a"
        lines.append(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {sign} | "
                     f"{n / r['seconds']:,.0f} | {r['peak_mb']:,.0f} | {len(r['removed'])} |")
    ref = results["refinery"]
    for other in ("datatrove", "refinery+rensa", "rensa"):
        o = results[other]
        sign = (f"{o['sign_seconds'] / ref['sign_seconds']:.2f}x" if o["sign_seconds"] and ref["sign_seconds"]
                else "n/a")  # ratio of times: > 1 means refinery signs faster
        lines.append(f"| refinery vs {other}: dF1 (refinery - other); {other}/refinery for time and memory | "
                     f"| | {scores['refinery']['f1'] - scores[other]['f1']:+.3f} | {sign} | "
                     f"{o['seconds'] / ref['seconds']:.2f}x | {o['peak_mb'] / ref['peak_mb']:.2f}x | |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        record(table, "numpy", "duckdb", "datasketch", "datatrove", "rensa")


if __name__ == "__main__":
    sys.exit(main())
