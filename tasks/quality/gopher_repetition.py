"""Gopher repetition rules (Rae et al. 2021): duplicated paragraphs, lines and word n-grams."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.quality._text import Words, find_duplicates, ratio
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


def _ngram_keys(ids: np.ndarray, words: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash keys of the word n-grams that stay inside one document, and their start positions."""
    total = len(ids)
    pos_in_doc = np.arange(total) - words.offsets[:-1][words.doc]
    valid = np.flatnonzero(pos_in_doc <= words.counts[words.doc] - n)
    key = (words.doc[valid].astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    for k in range(n):
        key = (key ^ ids[valid + k].astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(31)
    return key, valid


def _repeats(keys: np.ndarray) -> np.ndarray:
    """Whether each key occurred earlier in `keys`: a hash table, several times faster than sorting them."""
    import pandas as pd  # here, not at the top: importing pandas slows every worker's start

    return pd.Series(keys, copy=False).duplicated(keep="first").to_numpy()


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
        texts, words = batch.texts, batch.words
        n_docs = len(texts)
        out: dict[str, np.ndarray] = {}
        para_frac, para_chars, line_frac, line_chars = (np.zeros(n_docs) for _ in range(4))
        text_len = np.array([len(t) for t in texts], dtype=np.float64)
        for i, t in enumerate(texts):
            if not t:
                continue
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
        for n in TOP_NGRAMS:
            # The most frequent n-gram's characters (words joined by spaces) times its count.
            key, start = _ngram_keys(ids, words, n)
            top = np.zeros(n_docs)
            if len(key):
                _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
                occ = counts[inverse]
                doc = words.doc[start]
                best = np.zeros(n_docs, np.int64)
                np.maximum.at(best, doc, occ)
                at_best = np.flatnonzero(occ == best[doc])
                first_doc, first = np.unique(doc[at_best], return_index=True)
                s = start[at_best[first]]
                chars = cum[s + n] - cum[s] + (n - 1)
                top[first_doc] = best[first_doc] * chars
            out[f"gopher_top_{n}gram_char_frac"] = ratio(top, text_len)
        for n in DUP_NGRAMS:
            # Characters of the words covered by any repeated occurrence of an n-gram.
            key, start = _ngram_keys(ids, words, n)
            dup_chars = np.zeros(n_docs)
            if len(key):
                repeated = _repeats(key)
                rs = start[repeated]
                cover = np.zeros(len(ids) + 1, np.int64)
                np.add.at(cover, rs, 1)
                np.add.at(cover, rs + n, -1)
                covered = np.cumsum(cover[:-1]) > 0
                dup_chars = words.per_doc_sum(np.where(covered, wlen, 0.0))
            out[f"gopher_dup_{n}gram_char_frac"] = ratio(dup_chars, text_len)
        return out
