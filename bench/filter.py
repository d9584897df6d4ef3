"""Quality-filter benchmark: Refinery's Gopher, C4 and FineWeb rules vs datatrove's, same thresholds.

Documents: the Python reference documentation that ships with CPython (`pydoc_data.topics`, one document per
topic, prose mixed with code samples), prose documents sampled from its sentences, and degraded variants
(repeated lines, lists of short lines, symbol-heavy text, lorem ipsum). For each rule family the keep/drop
decision of both systems is compared per document; disagreements are broken down by the reason each system
gives, so every systematic one can be explained (see docs/filter.md). Throughput runs every family on every
document in one process.

With `--safety` it measures only Refinery's throughput with the safety family off and on (block lists
alone, then lists and the toxicity classifier), with the four quality families on and with none, the
secrets family off, on the same documents. The comparison with datatrove runs with the safety family off
and the secrets family off (datatrove's four filters do none of that work), then once more with secrets on.

    python -m bench.filter [--docs 3000] [--record]
    python -m bench.filter --safety [--docs 3000] [--record]
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter

import pyarrow as pa

from bench.common import record

FAMILIES = ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def make_docs(n: int, seed: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    docs = [t for t in topics.values() if len(t) > 200]
    pool = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(topics.values())) if 40 <= len(s.strip()) <= 300]
    while len(docs) < n:
        kind = rng.random()
        body = rng.sample(pool, rng.randint(4, 16))
        if kind < 0.55:  # prose paragraphs
            paras = [" ".join(body[i : i + 3]) for i in range(0, len(body), 3)]
            docs.append("\n\n".join(paras))
        elif kind < 0.65:  # repeated lines
            docs.append("\n".join(body[:3] * rng.randint(2, 6) + body[3:]))
        elif kind < 0.75:  # list of short lines
            docs.append("\n".join(w for s in body for w in s.split()[:3]))
        elif kind < 0.85:  # symbol-heavy
            docs.append(" ".join(f"{w} ### ..." if rng.random() < 0.3 else w for w in " ".join(body).split()))
        elif kind < 0.9:
            docs.append("Lorem ipsum dolor sit amet. " + " ".join(body))
        else:  # one sentence per line, no final punctuation
            docs.append("\n".join(s.rstrip(".!?") for s in body))
    return docs[:n]


def refinery_decisions(
    docs: list[str], family: str | None, safety: dict | None = None, secrets: bool = True
) -> tuple[list[str | None], float]:
    """Refinery's decisions with one family (None: all four; "none": none) on; `safety`: that family's settings."""
    from refinery.tasks.filter import FilterConfig, select
    from refinery.tasks.quality import compute_signals

    enabled = FAMILIES if family is None else (family,)
    sections = {f: {"enabled": f in enabled} for f in ("language", "code", *FAMILIES)}
    sections["safety"] = {"enabled": False} if safety is None else safety
    sections["secrets"] = {"enabled": secrets}
    sections["document_formats"] = []  # every document is judged as a web page, like datatrove judges it
    cfg = FilterConfig(**sections)
    t0 = time.perf_counter()
    reasons: list[str | None] = []
    for i in range(0, len(docs), 1000):
        batch = docs[i : i + 1000]
        signals = pa.table(compute_signals(pa.array(batch, pa.large_string()), cfg.families()))
        reasons += select(signals, ["text"] * len(batch), cfg)[0]
    return reasons, time.perf_counter() - t0


def datatrove_filters() -> dict:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return {
        "gopher_quality": GopherQualityFilter(),
        "gopher_repetition": GopherRepetitionFilter(),
        "c4": C4QualityFilter(),
        "fineweb": FineWebQualityFilter(),
    }


def datatrove_decisions(docs: list[str], family: str | None) -> tuple[list[str | None], float]:
    from datatrove.data import Document

    filters = datatrove_filters()
    chosen = FAMILIES if family is None else (family,)
    for f in chosen:  # warm up (tokenizer loading)
        filters[f].filter(Document(text="Warm up text. It has words.", id="w"))
    t0 = time.perf_counter()
    out: list[str | None] = []
    for i, text in enumerate(docs):
        reason = None
        for f in chosen:  # every filter on every document
            r = filters[f].filter(Document(text=text, id=str(i)))
            if r is not True and reason is None:
                reason = r[1] if isinstance(r, tuple) else "dropped"
        out.append(reason)
    return out, time.perf_counter() - t0


def safety_throughput(docs: list[str], repeats: int = 5) -> str:
    """Documents/s with the safety family off, lists only, lists and classifier: alone, and with the quality rules."""
    modes = {
        "safety off": None,
        "safety on, block lists only": {"toxicity": False},
        "safety on, block lists and toxicity classifier (default)": {},
    }
    qualities = ("the four quality families", "no quality family")
    runs = [(quality, name) for quality in qualities for name in modes]
    runs.remove(("no quality family", "safety off"))  # nothing at all to time
    refinery_decisions(docs[:50], None, {})  # load the lists and the classifier once, outside the timings
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):  # interleaved, so a busy moment of the machine does not favour one mode
        for quality, name in runs:
            family = None if quality == "the four quality families" else "none"
            seconds = refinery_decisions(docs, family, modes[name], secrets=False)[1]
            best[quality, name] = min(best[quality, name], seconds)
    base = best["the four quality families", "safety off"]
    lines = [
        f"### filter: safety family off and on, {len(docs)} documents, secrets family off, one process, "
        f"best of {repeats} interleaved runs",
        "",
        "| other families on | safety | docs/s | time vs the quality families alone |",
        "|---|---|---|---|",
    ]
    lines += [f"| {q} | {name} | {len(docs) / t:,.0f} | {t / base:.2f}x |" for (q, name), t in best.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--safety", action="store_true", help="only the safety family's cost, off and on")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    docs = make_docs(args.docs)
    if args.safety:
        table = safety_throughput(docs)
        print(table)
        if args.record:
            record(table, "numpy", "pyarrow", "alt-profanity-check", "scikit-learn")
        return
    lines = [
        f"### filter: {len(docs)} documents, decisions per rule family (default thresholds in both)",
        "",
        "| family | identical decisions | refinery drops | datatrove drops | only refinery drops (its reasons) | only datatrove drops (its reasons) |",
        "|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        ours, _ = refinery_decisions(docs, family)
        theirs, _ = datatrove_decisions(docs, family)
        same = sum((a is None) == (b is None) for a, b in zip(ours, theirs, strict=True))
        only_ours = Counter(a for a, b in zip(ours, theirs, strict=True) if a is not None and b is None)
        only_theirs = Counter(b for a, b in zip(ours, theirs, strict=True) if a is None and b is not None)
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in c.most_common(4)) or "-"  # noqa: E731
        lines.append(
            f"| {family} | {same / len(docs):.1%} | {sum(a is not None for a in ours)} | "
            f"{sum(b is not None for b in theirs)} | {fmt(only_ours)} | {fmt(only_theirs)} |"
        )
    _, t_ours = refinery_decisions(docs, None, secrets=False)  # the same work as datatrove's four filters
    _, t_more = refinery_decisions(docs, None, secrets=True)
    _, t_theirs = datatrove_decisions(docs, None)
    lines += [
        "",
        "| the four families on every document, one process | docs/s | vs datatrove |",
        "|---|---|---|",
        f"| refinery, the same four families | {len(docs) / t_ours:,.0f} | {t_theirs / t_ours:.1f}x |",
        f"| refinery, the four and the secrets family (on by default) | {len(docs) / t_more:,.0f} | "
        f"{t_theirs / t_more:.1f}x |",
        f"| datatrove | {len(docs) / t_theirs:,.0f} | 1.0x |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        record(table, "numpy", "pyarrow", "py3langid", "datatrove")


if __name__ == "__main__":
    main()
