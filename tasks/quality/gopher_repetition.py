"""Gopher repetition rules (Rae et al. 2021): duplicated paragraphs, lines and word n-grams."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.quality._text import Words, find_duplicates, per_doc, ratio, repeated, repeated_in_doc
from refinery.tasks.quality.base import Batch, Rule, RuleFamily

TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
_PARA_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")

_RULES = (
    Rule("gopher_dup_para_frac", "gopher_dup_para_frac", "max", "max_dup_para_frac"),
    Rule("gopher_dup_para_chars", "gopher_dup_para_char_frac", "max", "max_dup_para_char_frac"),
    Rule("gopher_dup_line_frac", "gopher_dup_line_frac", "max", "max_dup_line_frac"),
    Rule("gopher_dup_line_chars", "gopher_dup_line_char_frac", "max", "max_dup_line_char_frac"),
    *(Rule(f"gopher_top_{n}gram", f"gopher_top_{n}gram_char_frac", "max", f"max_top_{n}gram_char_frac")
      for n in TOP_NGRAMS),
    *(Rule(f"gopher_dup_{n}gram", f"gopher_dup_{n}gram_char_frac", "max", f"max_dup_{n}gram_char_frac")
      for n in DUP_NGRAMS),
)


def _occurrences(keys: np.ndarray) -> np.ndarray:
    """How often each key occurs in `keys`, for each position: a hash table rather than a sort."""
    import pandas as pd  # here, not at the top: importing pandas slows every worker's start

    codes, _ = pd.factorize(keys)
    return np.bincount(codes)[codes].astype(np.int64)


class _NgramKeys:
    """Hash keys of the word n-grams that stay inside one document, for n = 2, 3, ... in turn.

    The key of an n-gram is its document's seed mixed with its words one at a time, so the keys for n are the
    keys for n - 1 mixed with one more word: each step reuses the last, and every key is the one the full
    computation gives.
    """

    def __init__(self, ids: np.ndarray, words: Words) -> None:
        self.ids = ids.astype(np.uint64)
        pos_in_doc = np.arange(len(ids)) - words.offsets[:-1][words.doc]
        self.room = words.counts[words.doc] - pos_in_doc  # words from each position to its document's end
        self.key = (words.doc.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        self.n = 0

    def __call__(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys of the n-grams and their start positions (n never smaller than the last call's)."""
        while self.n < n:  # the key of the n-gram at s, for every s with a word at s + n - 1
            m = len(self.ids) - self.n
            key = (self.key[:m] ^ self.ids[self.n : self.n + m]) * np.uint64(0xBF58476D1CE4E5B9)
            key ^= key >> np.uint64(31)
            self.key, self.n = key, self.n + 1
        valid = np.flatnonzero(self.room >= n)
        return self.key[valid], valid


class GopherRepetitionRules(RuleFamily):
    """Gopher repetition rules: every fraction is over the document's characters (or paragraphs/lines)."""

    name = "gopher_repetition"
    applies_to = "prose"
    rules = _RULES

    max_dup_para_frac: float = Field(0.3, ge=0, le=1)
    max_dup_para_char_frac: float = Field(0.2, ge=0, le=1)
    max_dup_line_frac: float = Field(0.3, ge=0, le=1)
    max_dup_line_char_frac: float = Field(0.2, ge=0, le=1)
    max_top_2gram_char_frac: float = Field(0.20, ge=0, le=1)
    max_top_3gram_char_frac: float = Field(0.18, ge=0, le=1)
    max_top_4gram_char_frac: float = Field(0.16, ge=0, le=1)
    max_dup_5gram_char_frac: float = Field(0.15, ge=0, le=1)
    max_dup_6gram_char_frac: float = Field(0.14, ge=0, le=1)
    max_dup_7gram_char_frac: float = Field(0.13, ge=0, le=1)
    max_dup_8gram_char_frac: float = Field(0.12, ge=0, le=1)
    max_dup_9gram_char_frac: float = Field(0.11, ge=0, le=1)
    max_dup_10gram_char_frac: float = Field(0.10, ge=0, le=1)

    def signals(self, batch: Batch) -> dict[str, Any]:
        words = batch.words
        n_docs = len(batch)
        out: dict[str, np.ndarray] = {}
        para_frac, para_chars, line_frac, line_chars = (np.zeros(n_docs) for _ in range(4))
        text_len = pc.utf8_length(batch.arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        simple = batch.simple & (text_len > 0)
        if simple.any():
            docs = np.flatnonzero(simple)
            texts = batch.arr.take(pa.array(docs))
            # On simple texts `str.strip` is Arrow's ASCII trim, and `re.split` splits as Arrow's RE2 does.
            for pieces, frac, chars in (
                (pc.split_pattern_regex(pc.ascii_trim_whitespace(texts), r"\n{2,}"), para_frac, para_chars),
                (pc.split_pattern_regex(texts, r"\n+"), line_frac, line_chars),
            ):
                offsets = pieces.offsets.to_numpy().astype(np.int64)
                doc = np.repeat(docs, np.diff(offsets))
                flat = pieces.flatten()
                dup = repeated_in_doc(flat, doc)
                length = pc.binary_length(flat).to_numpy(zero_copy_only=False)
                frac[docs] = per_doc(doc, dup, n_docs)[docs] / np.diff(offsets)
                chars[docs] = per_doc(doc, np.where(dup, length, 0), n_docs)[docs] / text_len[docs]
        rest = np.flatnonzero(~batch.simple & (text_len > 0)).tolist()
        values = batch.texts if rest else []
        for i in rest:
            t = values[i]
            paras = _PARA_SPLIT.split(t.strip())
            dup, chars = find_duplicates(paras)
            para_frac[i], para_chars[i] = dup / len(paras), chars / len(t)
            lines = _LINE_SPLIT.split(t)
            dup, chars = find_duplicates(lines)
            line_frac[i], line_chars[i] = dup / len(lines), chars / len(t)
        out.update(
            gopher_dup_para_frac=para_frac, gopher_dup_para_char_frac=para_chars,
            gopher_dup_line_frac=line_frac, gopher_dup_line_char_frac=line_chars,
        )
        has_words = len(words.tokens) > 0
        ids = pc.dictionary_encode(words.tokens).indices.to_numpy(zero_copy_only=False) if has_words else np.empty(0, np.int32)
        wlen = pc.utf8_length(words.tokens).to_numpy(zero_copy_only=False).astype(np.float64) if has_words else np.empty(0)
        cum = np.concatenate([[0.0], np.cumsum(wlen)])
        ngram_keys = _NgramKeys(ids, words)
        for n in TOP_NGRAMS:
            # The most frequent n-gram's characters (words joined by spaces) times its count.
            key, start = ngram_keys(n)
            top = np.zeros(n_docs)
            if len(key):
                occ = _occurrences(key)
                doc = words.doc[start]
                best = np.zeros(n_docs, np.int64)
                np.maximum.at(best, doc, occ)
                at_best = np.flatnonzero(occ == best[doc])
                best_doc = doc[at_best]  # in order: the first of each document's run is its earliest
                first = np.flatnonzero(np.concatenate([[True], best_doc[1:] != best_doc[:-1]]))
                first_doc = best_doc[first]
                s = start[at_best[first]]
                chars = cum[s + n] - cum[s] + (n - 1)
                top[first_doc] = best[first_doc] * chars
            out[f"gopher_top_{n}gram_char_frac"] = ratio(top, text_len)
        for n in DUP_NGRAMS:
            # Characters of the words covered by any repeated occurrence of an n-gram.
            key, start = ngram_keys(n)
            dup_chars = np.zeros(n_docs)
            if len(key):
                rs = start[repeated(key)]
                cover = np.zeros(len(ids) + 1, np.int64)
                np.add.at(cover, rs, 1)
                np.add.at(cover, rs + n, -1)
                covered = np.cumsum(cover[:-1]) > 0
                dup_chars = words.per_doc_sum(np.where(covered, wlen, 0.0))
            out[f"gopher_dup_{n}gram_char_frac"] = ratio(dup_chars, text_len)
        return out
