"""FineWeb quality rules (Penedo et al. 2024): line punctuation, short lines, duplicated lines, list-likeness."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from refinery.tasks.quality._text import CLOSERS, TERMINAL_PUNCT, find_duplicates, ratio
from refinery.tasks.quality.base import Batch, Rule, RuleFamily


class FineWebRules(RuleFamily):
    """FineWeb's rules over non-empty lines."""

    name = "fineweb"
    applies_to = "prose"
    signal_fields = ("short_line_length",)
    rules = (
        Rule("fineweb_line_punct", "fineweb_line_punct_frac", "min", "min_line_punct_frac"),
        Rule("fineweb_short_lines", "fineweb_short_line_frac", "max", "max_short_line_frac"),
        Rule("fineweb_dup_line_chars", "fineweb_dup_line_char_frac", "max", "max_dup_line_char_frac"),
        Rule("fineweb_list_like", "fineweb_newline_word_ratio", "max", "max_newline_word_ratio"),
    )

    min_line_punct_frac: float = Field(0.12, ge=0, le=1)
    max_short_line_frac: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=1)
    max_dup_line_char_frac: float = Field(0.01, ge=0, le=1)
    max_newline_word_ratio: float = Field(0.3, ge=0)

    def signals(self, batch: Batch) -> dict[str, Any]:
        texts = batch.texts
        n_docs = len(texts)
        punct, short, dup_chars, newline = (np.zeros(n_docs) for _ in range(4))
        for i, t in enumerate(texts):
            lines = [ln for ln in t.split("\n") if ln.strip()]
            if not lines:
                continue
            punct[i] = sum(1 for ln in lines if ln.rstrip().rstrip(CLOSERS).endswith(TERMINAL_PUNCT)) / len(lines)
            short[i] = sum(1 for ln in lines if len(ln) <= self.short_line_length) / len(lines)
            flat_len = len(t) - t.count("\n")
            dup_chars[i] = find_duplicates(lines)[1] / flat_len if flat_len else 0.0
            newline[i] = t.count("\n")
        return {
            "fineweb_line_punct_frac": punct,
            "fineweb_short_line_frac": short,
            "fineweb_dup_line_char_frac": dup_chars,
            "fineweb_newline_word_ratio": ratio(newline, batch.words.counts),
        }
