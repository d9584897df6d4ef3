"""The rule families' faster signal code gives exactly the signals of the code it replaced.

Each reference below is the earlier computation, kept small: per-word features of every occurrence rather than of
each distinct word, pandas' hash tables for repeated n-grams, paragraphs and lines, Arrow splits and regular
expressions over the lines, the Arrow word split of the safety family, and scikit-learn for the toxicity
classifier. Values are compared bit for bit (floats by their bits, NaN included) on the corner-case corpus of
test_filter_fast_paths.py and on batches hypothesis builds from ASCII, other whitespace and non-ASCII pieces.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_filter_fast_paths import CORPUS, OTHER, PLAIN, PUNCT, SPACE, WORDS

from refinery.tasks.decontaminate import split_words
from refinery.tasks.filter import FilterConfig
from refinery.tasks.quality._text import (
    NOT_SIMPLE,
    Words,
    byte_counts,
    find_duplicates,
    per_doc,
    ratio,
    simple_texts,
)
from refinery.tasks.quality.base import Batch
from refinery.tasks.quality.gopher_quality import _HIGH, _unicode_word_features, _word_features
from refinery.tasks.quality.gopher_repetition import DUP_NGRAMS, TOP_NGRAMS
from refinery.tasks.quality.safety import SafetyRules
from refinery.tasks.safety import _split_words, _toxicity_params, safety_signals, toxicity_scores

# -- references: the computations the families made before ------------------------------------------------


def pd_repeated(keys: np.ndarray) -> np.ndarray:
    return pd.Series(keys, copy=False).duplicated(keep="first").to_numpy()


def pd_occurrences(keys: np.ndarray) -> np.ndarray:
    codes, _ = pd.factorize(keys)
    return np.bincount(codes)[codes].astype(np.int64)


def pd_repeated_in_doc(values: pa.Array, doc: np.ndarray) -> np.ndarray:
    if not len(values):
        return np.zeros(0, bool)
    codes = pc.dictionary_encode(values)
    ids = codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return pd_repeated(doc.astype(np.int64) * (len(codes.dictionary) + 1) + ids)


def ngram_keys(ids: np.ndarray, words: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys of the word n-grams inside one document (the document's seed mixed with each word) and starts."""
    pos_in_doc = np.arange(len(ids)) - words.offsets[:-1][words.doc]
    valid = np.flatnonzero(pos_in_doc <= words.counts[words.doc] - n)
    key = (words.doc[valid].astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    for k in range(n):
        key = (key ^ ids[valid + k].astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(31)
    return key, valid


def reference_repetition(batch: Batch) -> dict[str, np.ndarray]:
    words = Words.split(batch.arr)
    n_docs = len(batch)
    out: dict[str, np.ndarray] = {}
    para_frac, para_chars, line_frac, line_chars = (np.zeros(n_docs) for _ in range(4))
    text_len = pc.utf8_length(batch.arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
    simple = batch.simple & (text_len > 0)
    if simple.any():
        docs = np.flatnonzero(simple)
        texts = batch.arr.take(pa.array(docs))
        for pieces, frac, chars in (
            (pc.split_pattern_regex(pc.ascii_trim_whitespace(texts), r"\n{2,}"), para_frac, para_chars),
            (pc.split_pattern_regex(texts, r"\n+"), line_frac, line_chars),
        ):
            offsets = pieces.offsets.to_numpy().astype(np.int64)
            doc = np.repeat(docs, np.diff(offsets))
            flat = pieces.flatten()
            dup = pd_repeated_in_doc(flat, doc)
            length = pc.binary_length(flat).to_numpy(zero_copy_only=False)
            frac[docs] = per_doc(doc, dup, n_docs)[docs] / np.diff(offsets)
            chars[docs] = per_doc(doc, np.where(dup, length, 0), n_docs)[docs] / text_len[docs]
    for i in np.flatnonzero(~batch.simple & (text_len > 0)).tolist():
        t = batch.texts[i]
        paras = re.split(r"\n{2,}", t.strip())
        dup, chars = find_duplicates(paras)
        para_frac[i], para_chars[i] = dup / len(paras), chars / len(t)
        lines = re.split(r"\n+", t)
        dup, chars = find_duplicates(lines)
        line_frac[i], line_chars[i] = dup / len(lines), chars / len(t)
    out.update(gopher_dup_para_frac=para_frac, gopher_dup_para_char_frac=para_chars,
               gopher_dup_line_frac=line_frac, gopher_dup_line_char_frac=line_chars)
    has_words = len(words.tokens) > 0
    ids = pc.dictionary_encode(words.tokens).indices.to_numpy(zero_copy_only=False) if has_words else np.empty(0)
    wlen = pc.utf8_length(words.tokens).to_numpy(zero_copy_only=False).astype(np.float64) if has_words else np.empty(0)
    cum = np.concatenate([[0.0], np.cumsum(wlen)])
    for n in TOP_NGRAMS:
        key, start = ngram_keys(ids, words, n)
        top = np.zeros(n_docs)
        if len(key):
            occ = pd_occurrences(key)
            doc = words.doc[start]
            best = np.zeros(n_docs, np.int64)
            np.maximum.at(best, doc, occ)
            at_best = np.flatnonzero(occ == best[doc])
            best_doc = doc[at_best]
            first = np.flatnonzero(np.concatenate([[True], best_doc[1:] != best_doc[:-1]]))
            first_doc = best_doc[first]
            s = start[at_best[first]]
            top[first_doc] = best[first_doc] * (cum[s + n] - cum[s] + (n - 1))
        out[f"gopher_top_{n}gram_char_frac"] = ratio(top, text_len)
    for n in DUP_NGRAMS:
        key, start = ngram_keys(ids, words, n)
        dup_chars = np.zeros(n_docs)
        if len(key):
            rs = start[pd_repeated(key)]
            cover = np.zeros(len(ids) + 1, np.int64)
            np.add.at(cover, rs, 1)
            np.add.at(cover, rs + n, -1)
            dup_chars = words.per_doc_sum(np.where(np.cumsum(cover[:-1]) > 0, wlen, 0.0))
        out[f"gopher_dup_{n}gram_char_frac"] = ratio(dup_chars, text_len)
    return out


def reference_quality(batch: Batch, stop_words: list[str]) -> dict[str, np.ndarray]:
    words = Words.split(batch.arr)
    listed = pa.array(stop_words, pa.string())
    symbol, alpha, lengths, stop_idx = _word_features(words.tokens, listed)
    other = np.flatnonzero(byte_counts(words.tokens, _HIGH) > 0)
    if len(other):
        found = _unicode_word_features(words.tokens.take(pa.array(other)), listed)
        for values, part in zip((symbol, alpha, lengths, stop_idx), found, strict=True):
            values[other] = part
    n_all = words.counts.astype(np.float64)
    n_words = words.per_doc_sum(~symbol)
    hit = stop_idx >= 0
    distinct = np.unique(words.doc[hit].astype(np.int64) * (len(stop_words) + 1) + stop_idx[hit])
    n_stop = np.bincount(distinct // (len(stop_words) + 1), minlength=words.n_docs)

    def count(sub: str) -> np.ndarray:
        return pc.count_substring(batch.arr, sub).to_numpy(zero_copy_only=False).astype(np.float64)

    symbols = np.maximum(count("#"), count("...") + count("…"))
    bullets, ellipsis_lines = np.zeros(len(batch)), np.zeros(len(batch))
    if batch.simple.any():
        view = batch.lines
        docs = view.docs[view.counts[view.docs] > 0]
        bullet = pc.match_substring_regex(view.text, r"^[ \t]*[-*]").to_numpy(zero_copy_only=False)
        ellipsis = pc.match_substring_regex(view.text, r"\.\.\.[ \t]*$").to_numpy(zero_copy_only=False)
        bullets[docs] = per_doc(view.doc, bullet, view.n_docs)[docs] / view.counts[docs]
        ellipsis_lines[docs] = per_doc(view.doc, ellipsis, view.n_docs)[docs] / view.counts[docs]
    for i in np.flatnonzero(~batch.simple).tolist():
        lines = batch.texts[i].splitlines()
        if lines:
            bullets[i] = sum(1 for s in lines if s.lstrip().startswith(("•", "-", "*", "‣", "–"))) / len(lines)
            ellipsis_lines[i] = sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / len(lines)
    return {
        "gopher_words": n_words.astype(np.int64),
        "gopher_mean_word_length": ratio(words.per_doc_sum(np.where(symbol, 0.0, lengths)), n_words),
        "gopher_symbol_word_ratio": ratio(symbols, n_all),
        "gopher_bullet_lines_frac": bullets,
        "gopher_ellipsis_lines_frac": ellipsis_lines,
        "gopher_alpha_words_frac": ratio(words.per_doc_sum(alpha), n_all),
        "gopher_stop_words": n_stop.astype(np.int64),
    }


def reference_word_hits(lists: Any, texts: list[str]) -> tuple[list[int], list[int], list[str]]:
    """Block-list matches over the Arrow split of every text, looked up word by word."""
    words, starts = split_words(texts)
    n = len(texts)
    doc = np.repeat(np.arange(n), np.diff(starts))
    hits, first = np.zeros(n, np.int64), [""] * n
    if lists.words and len(words):
        hit_at = np.flatnonzero(pc.is_in(words, value_set=pa.array(sorted(lists.words))).to_numpy(zero_copy_only=False))
        hits += np.bincount(doc[hit_at], minlength=n)
        docs, j = np.unique(doc[hit_at], return_index=True)
        for d, w in zip(docs.tolist(), words.take(pa.array(hit_at[j])).to_pylist(), strict=True):
            first[d] = w
    for i, t in enumerate(texts):  # every phrase, searched in every text
        found = lists.phrases.findall(t or "") if lists.phrases is not None else []
        if found:
            hits[i] += len(found)
            first[i] = " ".join(found[0].lower().split())
    return hits.tolist(), np.diff(starts).tolist(), first


def sklearn_toxicity(texts: list[str]) -> np.ndarray:
    from profanity_check.profanity_check import model, vectorizer

    present = [i for i, t in enumerate(texts) if t and not t.isspace()]
    out = np.zeros(len(texts))
    if present:
        out[present] = model.predict_proba(vectorizer.transform([texts[i] for i in present]))[:, 1]
    return out


# -- comparison -----------------------------------------------------------------------------------------


def bits(values: Any) -> list[Any]:
    """Values to compare exactly: floats by their bits (so NaN equals NaN and -0.0 differs from 0.0)."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return [values.type, *values.to_pylist()]
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        return [arr.dtype, *arr.astype(np.float64).view(np.int64).tolist()]
    return [arr.dtype, *arr.tolist()]


def assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for column in expected:
        assert bits(got[column]) == bits(expected[column]), column


PIECES = WORDS + PUNCT + SPACE + OTHER + ["", "  ", "\n\n\n", "x", "the the the", "ab cd ab cd ab cd", "aα", "🖕"]
TEXT = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=60).map("".join),
    st.lists(st.sampled_from(PLAIN + PUNCT + SPACE), max_size=60).map("".join),  # simple, no C4 marker
    st.lists(st.sampled_from(PIECES), max_size=8).map(lambda p: " ".join(p * 4)),  # repeated n-grams
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80),
)
BATCHES = st.lists(TEXT, min_size=1, max_size=25)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def batch_of(texts: list[str]) -> Batch:
    return Batch(pa.array(texts, pa.large_string()))


# Paragraphs are split after `str.strip`: texts starting or ending with each kind of Unicode whitespace.
SPACES = ["\t", "\x0b", "\x0c", "\r", "\x1c", "\x1f", " ", "\x85", "\xa0", "\u1680", "\u2000", "\u200a",
          "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b", "\ufeff", "\u180e", "\u2060"]
EDGES = [f"{s}é\n\nx\n\né{s}" for s in SPACES] + [f"{s}\n\n{s}a{s}\n\n\n{s}a{s}\n{s}" for s in SPACES]


def test_repetition_is_the_earlier_computation_on_the_corpus() -> None:
    batch = batch_of(CORPUS + EDGES)
    assert_same(FilterConfig().gopher_repetition.signals(batch), reference_repetition(batch))


@FAST
@given(BATCHES)
def test_repetition_is_the_earlier_computation(texts: list[str]) -> None:
    batch = batch_of(texts)
    assert_same(FilterConfig().gopher_repetition.signals(batch), reference_repetition(batch))


@pytest.mark.parametrize("stop_words", [None, ["the", "(the)", "café", "AND", "ab"]])
def test_quality_is_the_earlier_computation_on_the_corpus(stop_words: list[str] | None) -> None:
    rules = FilterConfig().gopher_quality if stop_words is None else FilterConfig(
        gopher_quality={"stop_words": stop_words}).gopher_quality
    batch = batch_of(CORPUS)
    assert_same(rules.signals(batch), reference_quality(batch, rules.stop_words))


@FAST
@given(BATCHES)
def test_quality_is_the_earlier_computation(texts: list[str]) -> None:
    rules = FilterConfig().gopher_quality
    batch = batch_of(texts)
    assert_same(rules.signals(batch), reference_quality(batch, rules.stop_words))


def test_safety_words_from_the_whitespace_split_are_the_regex_split() -> None:
    arr = pa.array(CORPUS, pa.large_string())
    expected, starts = split_words(CORPUS)
    for split in (_split_words(CORPUS), _split_words(arr, Words.split(arr))):
        assert split.strings().to_pylist() == expected.to_pylist()
        assert split.starts.tolist() == starts.tolist()


@FAST
@given(BATCHES)
def test_safety_words_and_hits_are_the_earlier_computation(texts: list[str]) -> None:
    arr = pa.array(texts, pa.large_string())
    expected, starts = split_words(texts)
    split = _split_words(arr, Words.split(arr))
    assert split.strings().to_pylist() == expected.to_pylist()
    assert split.starts.tolist() == starts.tolist()
    lists = SafetyRules(extra_words=["ab cd", "the the", "x"]).lists()
    hits, counts, first = lists.word_hits(texts, split, arr)
    assert (hits.tolist(), counts.tolist(), first) == reference_word_hits(lists, texts)


def test_toxicity_reads_the_shipped_model_without_scikit_learn() -> None:
    from profanity_check.profanity_check import vectorizer
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    params = _toxicity_params()
    assert params is not None  # the model is applied with numpy, not through scikit-learn
    assert params.vocabulary == vectorizer.vocabulary_
    assert not set(params.vocabulary) & set(ENGLISH_STOP_WORDS)  # why stop words need not be removed
    assert bits(params.idf) == bits(vectorizer.idf_)


def test_toxicity_is_scikit_learn_on_the_corpus_and_labelled_set() -> None:
    import json
    from pathlib import Path

    labelled = Path(__file__).parent / "data" / "safety_labelled.jsonl"
    texts = CORPUS + [json.loads(line)["text"] for line in labelled.read_text().splitlines() if line.strip()]
    expected = bits(sklearn_toxicity(texts))
    arr = pa.array(texts, pa.large_string())
    assert bits(toxicity_scores(texts)) == expected
    assert bits(toxicity_scores(arr, _split_words(arr, Words.split(arr)))) == expected


@FAST
@given(BATCHES)
def test_toxicity_is_scikit_learn(texts: list[str]) -> None:
    arr = pa.array(texts, pa.large_string())
    expected = bits(sklearn_toxicity(texts))
    assert bits(toxicity_scores(arr)) == expected
    assert bits(toxicity_scores(arr, _split_words(arr, Words.split(arr)))) == expected


def test_safety_signals_with_the_batch_split_are_the_plain_ones() -> None:
    arr = pa.array(CORPUS, pa.large_string())
    rules = SafetyRules(check_text_urls=True)
    assert_same(safety_signals(CORPUS, None, rules, arr, Words.split(arr)), safety_signals(CORPUS, None, rules))


@FAST
@given(st.lists(st.one_of(TEXT, st.none()), min_size=1, max_size=25))
def test_simple_texts_are_the_regex_ones(texts: list[str | None]) -> None:
    arr = pa.array(texts, pa.large_string())
    expected = ~np.asarray(pc.match_substring_regex(arr, NOT_SIMPLE).fill_null(True).to_numpy(zero_copy_only=False))
    assert simple_texts(arr).tolist() == expected.tolist()
    assert simple_texts(arr.cast(pa.string()).slice(1)).tolist() == expected[1:].tolist()


OTHER_SETTINGS = {
    "c4": {"remove_citations": False, "require_terminal_punct": False, "max_word_length": 3, "min_words_per_line": 0},
    "fineweb": {"short_line_length": 3},
    "code": {"header_lines": 2},
}


@FAST
@given(BATCHES, st.booleans())
@example(["\n"], False)  # every line of the batch empty: no byte to read at any line's end
def test_line_rules_are_their_per_document_definition(texts: list[str], other: bool) -> None:
    """The compiled passes over simple texts' lines (C4, FineWeb, Gopher) give the Python definition's values."""
    config = FilterConfig(**(OTHER_SETTINGS if other else {}))
    for family in ("c4", "fineweb", "gopher_quality", "gopher_repetition", "code"):
        rules = getattr(config, family)
        fast = rules.signals(batch_of(texts))
        slow = batch_of(texts)
        slow.simple = np.zeros(len(texts), bool)  # every text takes the per-document path
        assert_same(fast, rules.signals(slow))


def test_toxicity_without_the_shipped_arrays_is_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model `_toxicity_params` cannot read is scored by scikit-learn itself."""
    import refinery.tasks.safety as safety

    monkeypatch.setattr(safety, "_toxicity_params", lambda: None)
    texts = CORPUS[:300]
    assert bits(safety.toxicity_scores(texts)) == bits(sklearn_toxicity(texts))


def test_scoring_does_not_import_scikit_learn() -> None:
    """Importing it takes seconds in every worker; the shipped model's arrays are applied without it."""
    code = (
        "import sys, pyarrow as pa\n"
        "from refinery.tasks.filter import FilterConfig\n"
        "from refinery.tasks.quality import compute_signals\n"
        "families = {k: v for k, v in FilterConfig().families().items() if k != 'language'}\n"
        "compute_signals(pa.array(['You are an idiot. ' * 9, 'caf\\u00e9 ' * 9, '']), families)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'profanity_check'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
