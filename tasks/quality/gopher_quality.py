"""Gopher quality rules (Rae et al. 2021, appendix A): word counts and lengths, symbols, bullets, stop words."""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.buffers import ASCII_LOWER, ascii_table, text_bytes
from refinery.tasks.quality._text import TRIM, byte_counts, byte_ranges, per_doc, ratio
from refinery.tasks.quality.base import Batch, Rule, RuleFamily

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


_PUNCT = ascii_table(string.punctuation)  # on ASCII, the characters of \p{P} and \p{S}, and of TRIM
_LETTER = ascii_table(string.ascii_letters)
_HIGH = np.arange(256) >= 128


def _unicode_word_features(tok: pa.Array, stop_words: pa.Array) -> tuple[np.ndarray, ...]:
    """Per word: only punctuation or symbols, holds a letter, length once trimmed, index in the stop words."""
    symbol = pc.match_substring_regex(tok, r"^[\p{P}\p{S}]+$").to_numpy(zero_copy_only=False)
    alpha = pc.match_substring_regex(tok, r"\p{L}").to_numpy(zero_copy_only=False)
    trimmed = pc.utf8_trim(tok, TRIM)
    lengths = pc.utf8_length(trimmed).to_numpy(zero_copy_only=False).astype(np.float64)
    stop = pc.index_in(pc.utf8_lower(trimmed), value_set=stop_words)
    return symbol, alpha, lengths, stop.fill_null(-1).to_numpy(zero_copy_only=False)


def _word_features(tok: pa.Array, stop_words: pa.Array) -> tuple[np.ndarray, ...]:
    """`_unicode_word_features` for ASCII words, with numpy over their bytes (others get wrong values)."""
    data, offsets = text_bytes(tok)
    size = np.diff(offsets)
    symbol = (byte_counts(tok, _PUNCT) == size) & (size > 0)
    alpha = byte_counts(tok, _LETTER) > 0
    kept = np.flatnonzero(~_PUNCT[data])  # the bytes trimming keeps: a word's first and last of them
    lo, hi = np.searchsorted(kept, offsets[:-1]), np.searchsorted(kept, offsets[1:])
    has = hi > lo
    first = np.where(has, kept[np.minimum(lo, len(kept) - 1)] if len(kept) else 0, offsets[:-1])
    end = np.where(has, kept[np.maximum(hi - 1, 0)] + 1 if len(kept) else 0, offsets[:-1])
    trimmed = byte_ranges(tok, first, end, ASCII_LOWER[data])
    stop = pc.index_in(trimmed, value_set=stop_words)
    stop_idx = np.array(stop.fill_null(-1).to_numpy(zero_copy_only=False))  # a writable copy
    return symbol, alpha, (end - first).astype(np.float64), stop_idx


class GopherQualityRules(RuleFamily):
    """Gopher quality rules over whitespace words; a word of only punctuation or symbols is not counted."""

    name = "gopher_quality"
    applies_to = "prose"
    signal_fields = ("stop_words",)
    rules = (
        Rule("gopher_word_count", "gopher_words", "min", "min_words"),
        Rule("gopher_word_count", "gopher_words", "max", "max_words"),
        Rule("gopher_mean_word_length", "gopher_mean_word_length", "min", "min_mean_word_length"),
        Rule("gopher_mean_word_length", "gopher_mean_word_length", "max", "max_mean_word_length"),
        Rule("gopher_symbol_word_ratio", "gopher_symbol_word_ratio", "max", "max_symbol_word_ratio"),
        Rule("gopher_bullet_lines", "gopher_bullet_lines_frac", "max", "max_bullet_lines_frac"),
        Rule("gopher_ellipsis_lines", "gopher_ellipsis_lines_frac", "max", "max_ellipsis_lines_frac"),
        Rule("gopher_alpha_words", "gopher_alpha_words_frac", "min", "min_alpha_words_frac"),
        Rule("gopher_stop_words", "gopher_stop_words", "min", "min_stop_words"),
    )

    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_frac: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_frac: float = Field(0.3, ge=0, le=1)
    min_alpha_words_frac: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0)
    stop_words: list[str] = Field(default_factory=lambda: list(STOP_WORDS))

    def signals(self, batch: Batch) -> dict[str, Any]:
        # Every per-word feature is a function of the word alone: computed once per distinct word of the batch
        # (`words.vocab`) and spread to the occurrences with `words.ids`.
        words = batch.words
        vocab = words.vocab
        stop_words = pa.array(self.stop_words, pa.string())
        symbol, alpha, lengths, stop_idx = _word_features(vocab, stop_words)
        other = np.flatnonzero(byte_counts(vocab, _HIGH) > 0)
        if len(other):  # words with non-ASCII characters: Unicode classes and trimming, with Arrow
            found = _unicode_word_features(vocab.take(pa.array(other)), stop_words)
            for values, part in zip((symbol, alpha, lengths, stop_idx), found, strict=True):
                values[other] = part
        # `str.count` of "#", "..." and "…" (non-overlapping occurrences, never across whitespace) is the sum
        # of their counts in the text's words.
        table = np.zeros((len(vocab), 6))
        table[:, 0], table[:, 1], table[:, 2] = ~symbol, np.where(symbol, 0.0, lengths), alpha
        for c, sub in enumerate(("#", "...", "…"), start=3):
            if len(vocab):
                table[:, c] = pc.count_substring(vocab, sub).to_numpy(zero_copy_only=False)
        sums = words.sum_by_doc(table)
        n_words = sums[:, 0]
        n_all = words.counts.astype(np.float64)
        n_stop = words.distinct_by_doc(stop_idx, len(self.stop_words))
        symbols = np.maximum(sums[:, 3], sums[:, 4] + sums[:, 5])
        bullets = np.zeros(len(batch))
        ellipsis_lines = np.zeros(len(batch))
        if batch.simple.any():  # on ASCII lines: "-" or "*" after spaces; "..." before spaces
            view = batch.lines
            docs = view.docs[view.counts[view.docs] > 0]
            count = view.counts[docs]
            # Bytes to read where a line has none (its `last` is 0, so `last - 2` is -2): every index stays valid
            # even when no line of the batch has a byte; those lines are masked out by `has`.
            data = np.append(text_bytes(view.text)[0], np.zeros(3, np.uint8))
            has, first, last = view.bounds  # each line's first and last byte other than space and tab
            bullet = has & ((data[first] == 45) | (data[first] == 42))
            dots = has & (last - 2 >= first) & (data[last] == 46) & (data[last - 1] == 46) & (data[last - 2] == 46)
            bullets[docs] = per_doc(view.doc, bullet, view.n_docs)[docs] / count
            ellipsis_lines[docs] = per_doc(view.doc, dots, view.n_docs)[docs] / count
        rest = np.flatnonzero(~batch.simple).tolist()
        texts = batch.texts if rest else []
        for i in rest:
            lines = texts[i].splitlines()
            if lines:
                bullets[i] = sum(1 for s in lines if s.lstrip().startswith(("•", "-", "*", "‣", "–"))) / len(lines)
                ellipsis_lines[i] = sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / len(lines)
        return {
            "gopher_words": n_words.astype(np.int64),
            "gopher_mean_word_length": ratio(sums[:, 1], n_words),
            "gopher_symbol_word_ratio": ratio(symbols, n_all),
            "gopher_bullet_lines_frac": bullets,
            "gopher_ellipsis_lines_frac": ellipsis_lines,
            "gopher_alpha_words_frac": ratio(sums[:, 2], n_all),
            "gopher_stop_words": n_stop.astype(np.int64),
        }
