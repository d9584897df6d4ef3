"""Decontamination: drop training documents that share an n-gram with an evaluation set.

A model scored on text it was trained on reports a number that means little.
Following GPT-3 (Brown et al. 2020) and its successors, a training document is
contaminated when it contains any `n`-word sequence (n = 13 by default) that
also occurs in an evaluation set.

How it stays fast on large corpora:
- Words are lower-cased runs of letters, digits and marks, split by Arrow, so punctuation and
  spacing do not hide a match. Each distinct word is hashed once per batch to a
  stable 64-bit integer (blake2b), and every n-gram becomes a polynomial rolling
  hash of its words, computed for a whole batch at once with numpy (wrapping
  uint64 arithmetic).
- The evaluation sets' n-gram hashes form one sorted array; a batch of training
  n-grams is looked up with a single `searchsorted`.
- The index is built once per process and cached, so a worker that scores many
  batches reads the evaluation sets once.

The signals (`decontam_ngrams`: matching n-gram positions, `decontam_span`: the
first matching n-gram's words, `decontam_eval_set`: the evaluation file it came
from) are columns like every other filter signal; the selection drops a
document whose count exceeds `max_ngram_matches` under the reason `contaminated`,
with the matched span in the drop's `detail`. `max_ngram_matches: null` only
flags: the columns stay on the kept documents. The rule family (settings, rules)
is `refinery.tasks.quality.decontamination`; this module reads, hashes and indexes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery.storage.manifest import file_sha256

if TYPE_CHECKING:
    from refinery.tasks.quality.decontamination import DecontaminationRules

EVAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
# Words are runs of letters, digits, marks and underscores (RE2 syntax, matched by Arrow).
_NON_WORD = r"[^\p{L}\p{N}\p{M}_]+"
# Odd 64-bit multiplier for the rolling hash (from splitmix64); any large odd constant works.
_BASE = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------- reading evaluation sets


def eval_set_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The evaluation files named by `paths` (folders are searched recursively), sorted."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EVAL_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(
                f"evaluation set {p} does not exist; fix filter.decontamination.eval_sets "
                "(JSONL/Parquet/text files or folders)"
            )
    return sorted(set(out))


def eval_sets_digest(paths: Sequence[str | os.PathLike[str]]) -> str:
    """Checksum of the evaluation files' names and contents (what the signals depend on, not their mtimes)."""
    files = [[str(p), file_sha256(p)] for p in eval_set_files(paths)]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def read_eval_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The texts of one evaluation file: a field of each JSONL line or Parquet row, or a whole text file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise ValueError(
                f"evaluation set {path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                "set filter.decontamination.text_field"
            )
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(
                        f"{path}:{lineno}: expected a JSON object with a {text_field!r} field; "
                        "set filter.decontamination.text_field"
                    )
                if record[text_field]:
                    yield str(record[text_field])
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------- hashing


def split_words(texts: Sequence[str | None]) -> tuple[pa.Array, np.ndarray]:
    """All lower-cased words of a batch, flattened (Arrow, vectorised), and where each document starts."""
    arr = pc.fill_null(pa.array(texts, pa.large_string()), "")
    lists = pc.split_pattern_regex(pc.utf8_lower(arr), _NON_WORD)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    flat = lists.flatten()
    doc = np.repeat(np.arange(len(texts)), np.diff(offsets))
    nonempty = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    doc = doc[nonempty]
    starts = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.bincount(doc, minlength=len(texts)), out=starts[1:])
    return flat.filter(pa.array(nonempty)), starts


def words_of(text: str) -> list[str]:
    """Lower-cased word tokens: what two texts must share, whatever their punctuation and spacing."""
    return split_words([text])[0].to_pylist()


def _word_hashes(words: pa.Array) -> np.ndarray:
    """A stable 64-bit hash per word (identical in every process, unlike `hash()`); each distinct word hashed once."""
    encoded = pc.dictionary_encode(words)
    distinct = np.fromiter(
        (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
         for w in encoded.dictionary.to_pylist()),
        dtype=np.uint64, count=len(encoded.dictionary),
    )
    return distinct[encoded.indices.to_numpy(zero_copy_only=False)] if len(words) else np.empty(0, np.uint64)


def rolling_ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of `n` consecutive words: sum of w[i+k] * B^(n-1-k), mod 2^64."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64)
    acc = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * _BASE + word_hashes[k : k + m]
    return acc


@dataclass
class _Flat:
    """A batch of documents as one word array, with where each document starts."""

    words: pa.Array
    hashes: np.ndarray
    starts: np.ndarray  # len n_docs + 1

    @classmethod
    def of(cls, texts: Sequence[str | None]) -> _Flat:
        words, starts = split_words(texts)
        return cls(words, _word_hashes(words), starts)

    def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(hash, start position) of every n-gram that lies inside one document."""
        h = rolling_ngram_hashes(self.hashes, n)
        pos = np.arange(len(h), dtype=np.int64)
        doc_end = self.starts[np.searchsorted(self.starts, pos, side="right")] if len(h) else pos
        inside = pos + n <= doc_end
        return h[inside], pos[inside]


# --------------------------------------------------------------------------- the index


@dataclass
class NgramIndex:
    """The n-gram hashes of the evaluation sets, sorted, with the eval file each first came from."""

    n: int
    hashes: np.ndarray  # sorted unique uint64
    origin: np.ndarray  # index into `names`
    names: list[str]

    @classmethod
    def build(cls, paths: Sequence[str | os.PathLike[str]], n: int = 13, text_field: str = "text") -> NgramIndex:
        files = eval_set_files(paths)
        if not files:
            raise FileNotFoundError(f"no evaluation files ({', '.join(EVAL_SUFFIXES)}) under {list(paths)}")
        all_h, all_o = [], []
        for i, f in enumerate(files):
            texts = list(read_eval_texts(f, text_field))
            h, _ = _Flat.of(texts).ngrams(n)
            all_h.append(h)
            all_o.append(np.full(len(h), i, np.int32))
        hashes = np.concatenate(all_h) if all_h else np.empty(0, np.uint64)
        origin = np.concatenate(all_o) if all_o else np.empty(0, np.int32)
        hashes, first = np.unique(hashes, return_index=True)
        return cls(n, hashes, origin[first], [f.name for f in files])

    def __len__(self) -> int:
        return len(self.hashes)

    def scan(self, texts: Sequence[str | None]) -> dict[str, Any]:
        """Per document: matching n-gram positions, the first matching span, and its eval file."""
        flat = _Flat.of(texts)
        h, pos = flat.ngrams(self.n)
        n_docs = len(texts)
        counts = np.zeros(n_docs, np.int64)
        spans: list[str] = [""] * n_docs
        origins: list[str] = [""] * n_docs
        if len(h) and len(self.hashes):
            at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
            hit = self.hashes[at] == h
            hit_pos = pos[hit]
            hit_doc = np.searchsorted(flat.starts, hit_pos, side="right") - 1
            counts = np.bincount(hit_doc, minlength=n_docs).astype(np.int64)
            docs, first = np.unique(hit_doc, return_index=True)  # the first hit of each document
            for d, j in zip(docs.tolist(), first.tolist(), strict=True):
                p = int(hit_pos[j])
                spans[d] = " ".join(flat.words.slice(p, self.n).to_pylist())
                origins[d] = self.names[int(self.origin[at[hit][j]])]
        return {"decontam_ngrams": counts, "decontam_span": spans, "decontam_eval_set": origins}


@functools.lru_cache(maxsize=4)
def _cached_index(n: int, text_field: str, files: tuple[tuple[str, int, int], ...]) -> NgramIndex:
    return NgramIndex.build([f for f, _, _ in files], n, text_field)


def index_for(rules: DecontaminationRules) -> NgramIndex:
    """The index for `rules`, built once per process (rebuilt when an eval file's size or mtime changes)."""
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in eval_set_files(rules.eval_sets))
    return _cached_index(rules.n, rules.text_field, stats)


def decontamination_signals(texts: Sequence[str | None], rules: DecontaminationRules) -> dict[str, Any]:
    """Signal columns for a batch (pure apart from the per-process index cache)."""
    out = index_for(rules).scan(texts)
    return {
        "decontam_ngrams": pa.array(out["decontam_ngrams"], pa.int64()),
        "decontam_span": pa.array(out["decontam_span"], pa.string()),
        "decontam_eval_set": pa.array(out["decontam_eval_set"], pa.string()),
    }
