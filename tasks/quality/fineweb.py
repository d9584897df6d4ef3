"""FineWeb quality rules (Penedo et al. 2024): line punctuation, short lines, duplicated lines, list-likeness."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.quality._text import (
    CLOSERS,
    TERMINAL_PUNCT,
    find_duplicates,
    per_doc,
    ratio,
    repeated_in_doc,
)
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
        n_docs = len(batch)
        punct, short, dup_chars, newline = (np.zeros(n_docs) for _ in range(4))
        if batch.simple.any():
            self._simple_signals(batch, punct, short, dup_chars, newline)
        rest = np.flatnonzero(~batch.simple).tolist()
        texts = batch.texts if rest else []
        for i in rest:
            punct[i], short[i], dup_chars[i], newline[i] = self.text_signals(texts[i])
        return {
            "fineweb_line_punct_frac": punct,
            "fineweb_short_line_frac": short,
            "fineweb_dup_line_char_frac": dup_chars,
            "fineweb_newline_word_ratio": ratio(newline, batch.words.counts),
        }

    def text_signals(self, t: str) -> tuple[float, float, float, int]:
        """Line punctuation, short lines, duplicated line characters and newlines of one text (definition)."""
        lines = [ln for ln in t.split("\n") if ln.strip()]
        if not lines:
            return 0.0, 0.0, 0.0, 0
        punct = sum(1 for ln in lines if ln.rstrip().rstrip(CLOSERS).endswith(TERMINAL_PUNCT)) / len(lines)
        short = sum(1 for ln in lines if len(ln) <= self.short_line_length) / len(lines)
        flat_len = len(t) - t.count("\n")
        dup_chars = find_duplicates(lines)[1] / flat_len if flat_len else 0.0
        return punct, short, dup_chars, t.count("\n")

    def _simple_signals(
        self, batch: Batch, punct: np.ndarray, short: np.ndarray, dup_chars: np.ndarray, newline: np.ndarray
    ) -> None:
        """`text_signals` for every simple text at once: its non-blank lines are the splitlines ones."""
        lines = batch.lines
        blank = pc.match_substring_regex(lines.text, r"^[ \t]*$").to_numpy(zero_copy_only=False)
        at = np.flatnonzero(~blank)
        text, doc, n = lines.text.take(pa.array(at)), lines.doc[at], lines.n_docs
        length = pc.binary_length(text).to_numpy(zero_copy_only=False)
        # rstrip, rstrip(CLOSERS), then a terminal mark: on ASCII, the mark, closers, then spaces to the end
        ends = pc.match_substring_regex(text, r"[.!?][\"')\]]*[ \t]*$").to_numpy(zero_copy_only=False)
        count = per_doc(doc, None, n)
        docs = lines.docs[count[lines.docs] > 0]
        texts = batch.arr.take(pa.array(docs))
        breaks = pc.count_substring(texts, "\n").to_numpy(zero_copy_only=False).astype(np.int64)
        flat_len = pc.binary_length(texts).to_numpy(zero_copy_only=False) - breaks
        dup = per_doc(doc, np.where(repeated_in_doc(text, doc), length, 0), n)[docs]
        punct[docs] = per_doc(doc, ends, n)[docs] / count[docs]
        short[docs] = per_doc(doc, length <= self.short_line_length, n)[docs] / count[docs]
        dup_chars[docs] = np.divide(dup, flat_len, out=np.zeros(len(docs)), where=flat_len > 0)
        newline[docs] = breaks
