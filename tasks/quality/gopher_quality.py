"""Gopher quality rules (Rae et al. 2021, appendix A): word counts and lengths, symbols, bullets, stop words."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.quality._text import TRIM, ratio
from refinery.tasks.quality.base import Batch, Rule, RuleFamily

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


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
        texts, words = batch.texts, batch.words
        tok = words.tokens
        symbol = pc.match_substring_regex(tok, r"^[\p{P}\p{S}]+$").to_numpy(zero_copy_only=False)
        alpha = pc.match_substring_regex(tok, r"\p{L}").to_numpy(zero_copy_only=False)
        trimmed = pc.utf8_trim(tok, TRIM)
        lengths = pc.utf8_length(trimmed).to_numpy(zero_copy_only=False).astype(np.float64)
        n_all = words.counts.astype(np.float64)
        n_words = words.per_doc_sum(~symbol)
        stop = pc.index_in(pc.utf8_lower(trimmed), value_set=pa.array(self.stop_words, pa.string()))
        stop_idx = stop.fill_null(-1).to_numpy(zero_copy_only=False)
        hit = stop_idx >= 0
        distinct = np.unique(words.doc[hit].astype(np.int64) * (len(self.stop_words) + 1) + stop_idx[hit])
        n_stop = np.bincount(distinct // (len(self.stop_words) + 1), minlength=words.n_docs)

        # Arrow counts non-overlapping occurrences, as `str.count` does.
        def count(sub: str) -> np.ndarray:
            return pc.count_substring(batch.arr, sub).to_numpy(zero_copy_only=False).astype(np.float64)

        symbols = np.maximum(count("#"), count("...") + count("…"))
        bullets = np.zeros(len(texts))
        ellipsis_lines = np.zeros(len(texts))
        for i, t in enumerate(texts):
            lines = t.splitlines()
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
