"""FineWeb quality rules (Penedo et al. 2024): line punctuation, short lines, duplicated lines, list-likeness."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.buffers import ascii_table, fnv1a_64, same_bytes, text_bytes
from refinery.tasks.quality._text import CLOSERS, TERMINAL_PUNCT, byte_counts, find_duplicates, ratio
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
        """`text_signals` for every simple text at once: its non-blank lines are the splitlines ones.

        One compiled pass over the lines: on ASCII, a line ends with a terminal mark when, less its trailing
        spaces and tabs and then its trailing closers, it ends with one of `.!?`; a duplicated line is one
        equal to an earlier non-blank line of its text.
        """
        lines = batch.lines
        data, offsets = text_bytes(lines.text)
        has, first, last = lines.bounds
        count, ends, shorts, dup = _line_counts(
            data, offsets, has, first, last, lines.doc, lines.n_docs, self.short_line_length
        )
        docs = lines.docs[count[lines.docs] > 0]
        texts = batch.arr.take(pa.array(docs))
        breaks = byte_counts(texts, _NEWLINE)
        flat_len = pc.binary_length(texts).to_numpy(zero_copy_only=False) - breaks
        punct[docs] = ends[docs].astype(np.float64) / count[docs]
        short[docs] = shorts[docs].astype(np.float64) / count[docs]
        dup_chars[docs] = np.divide(
            dup[docs].astype(np.float64), flat_len, out=np.zeros(len(docs)), where=flat_len > 0
        )
        newline[docs] = breaks


_NEWLINE = ascii_table("\n")


@numba.njit(cache=True, nogil=True)
def _line_counts(data, offsets, has, first, last, doc, n_docs, short_length):  # noqa: ANN001, ANN202
    """Per document: non-blank lines, those ending with a terminal mark, short ones, and the bytes of the
    lines equal to an earlier non-blank line of the document (lines come grouped by document, in order)."""
    count = np.zeros(n_docs, np.int64)  # pragma: no cover (compiled)
    ends = np.zeros(n_docs, np.int64)
    shorts = np.zeros(n_docs, np.int64)
    dup = np.zeros(n_docs, np.int64)
    n = len(offsets) - 1
    size = 2
    while size < 2 * n:
        size *= 2
    slot = np.full(size, -1, np.int64)
    used = np.empty(n, np.int64)
    n_used = 0
    for j in range(n):
        if j > 0 and doc[j] != doc[j - 1]:  # a new document: empty the table
            for u in range(n_used):
                slot[used[u]] = -1
            n_used = 0
        if not has[j]:
            continue
        d = doc[j]
        a, b = offsets[j], offsets[j + 1]
        count[d] += 1
        if b - a <= short_length:
            shorts[d] += 1
        q = last[j]
        while q >= first[j] and (data[q] == 34 or data[q] == 39 or data[q] == 41 or data[q] == 93):
            q -= 1
        if q >= first[j] and (data[q] == 46 or data[q] == 33 or data[q] == 63):
            ends[d] += 1
        h = fnv1a_64(data, a, b)
        i = np.int64((h ^ (h >> np.uint64(29))) & np.uint64(size - 1))
        while True:
            other = slot[i]
            if other < 0:
                slot[i] = j
                used[n_used] = i
                n_used += 1
                break
            c, e = offsets[other], offsets[other + 1]
            if e - c == b - a and same_bytes(data, c, e, data, a):
                dup[d] += b - a
                break
            i = np.int64((np.uint64(i) + np.uint64(1)) & np.uint64(size - 1))
    return count, ends, shorts, dup
