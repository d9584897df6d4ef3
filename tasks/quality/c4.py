"""C4 rules (Raffel et al. 2020): line-level rules decide which lines count, document-level rules drop.

The text itself is not rewritten: a line that fails the line rules only stops counting toward sentences.
"""

from __future__ import annotations

import re
from typing import Any

import numba
import numpy as np
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.buffers import ascii_table, text_bytes
from refinery.tasks.quality._text import Lines, per_doc
from refinery.tasks.quality.base import Batch, Rule, RuleFamily

C4_END_PUNCT = (".", "?", "!", '"', "'")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?…]+(?=[\s\"'”’)\]]|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# What a line rule looks for besides sentences; a simple text holding none of it needs no per-line search.
_MARKERS = "(?i:lorem ipsum|javascript|" + "|".join(_POLICY) + r")|[{\[]"


class C4Rules(RuleFamily):
    """C4's document rules, over the lines that pass its line rules."""

    name = "c4"
    applies_to = "prose"
    signal_fields = (
        "remove_citations", "require_terminal_punct", "min_words_per_line", "max_word_length",
        "skip_javascript_lines", "skip_policy_lines",
    )
    rules = (
        Rule("c4_lorem_ipsum", "c4_lorem_ipsum", "flag", "drop_lorem_ipsum"),
        Rule("c4_curly_bracket", "c4_curly_bracket", "flag", "drop_curly_bracket"),
        Rule("c4_too_few_sentences", "c4_sentences", "min", "min_sentences"),
    )

    min_sentences: int = Field(5, ge=0, description="sentences in the lines that pass the line rules")
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    remove_citations: bool = True
    require_terminal_punct: bool = True
    min_words_per_line: int = Field(3, ge=0)
    max_word_length: int = Field(1000, ge=1)
    skip_javascript_lines: bool = True
    skip_policy_lines: bool = True

    def signals(self, batch: Batch) -> dict[str, Any]:
        n_docs = len(batch)
        sentences = np.zeros(n_docs, np.int64)
        lorem = np.zeros(n_docs, bool)
        curly = np.zeros(n_docs, bool)
        kept_frac = np.zeros(n_docs)
        fast = batch.simple.copy()
        if fast.any():  # texts that may hold a marker a line rule looks for take the Python path
            marked = pc.match_substring_regex(batch.arr, _MARKERS).fill_null(True)
            fast &= ~np.asarray(marked.to_numpy(zero_copy_only=False), bool)
        if fast.any():
            self._simple_signals(batch.lines, fast, sentences, kept_frac)
        rest = np.flatnonzero(~fast).tolist()
        texts = batch.texts if rest else []
        for i in rest:
            sentences[i], lorem[i], curly[i], kept_frac[i] = self.text_signals(texts[i])
        return {"c4_sentences": sentences, "c4_lorem_ipsum": lorem, "c4_curly_bracket": curly, "c4_kept_lines_frac": kept_frac}

    def text_signals(self, t: str) -> tuple[int, bool, bool, float]:
        """Sentences, lorem ipsum, curly bracket and the share of lines kept of one text (the definition)."""
        lines = t.splitlines()
        kept = sentences = 0
        lorem = curly = False
        for raw in lines:
            line = raw.strip()
            line_words = line.split()
            # Only a line longer than the limit can hold a word longer than it: most lines skip the scan.
            if len(line) > self.max_word_length and any(len(w) > self.max_word_length for w in line_words):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.require_terminal_punct and (not line.endswith(C4_END_PUNCT) or line.endswith("...")):
                continue
            if len(line_words) < self.min_words_per_line:
                continue
            low = line.lower()
            if "lorem ipsum" in low:
                lorem = True
            if self.skip_javascript_lines and "javascript" in low:
                continue
            if "{" in line:
                curly = True
            if self.skip_policy_lines and any(p in low for p in _POLICY):
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept += 1
        return sentences, lorem, curly, kept / len(lines) if lines else 0.0

    def _simple_signals(
        self, lines: Lines, fast: np.ndarray, sentences: np.ndarray, kept_frac: np.ndarray
    ) -> None:
        """`text_signals` for the simple texts marked `fast` at once, one compiled pass over their lines' bytes.

        Those texts hold no citation, lorem ipsum, JavaScript, policy phrase or curly bracket (`_MARKERS`), so
        a line counts when its words are short enough and many enough and it ends with a sentence's mark.
        """
        data, offsets = text_bytes(lines.text)
        has, first, last = lines.bounds
        per_line = _line_sentences(
            data, offsets, has, first, last, self.min_words_per_line, self.max_word_length,
            self.require_terminal_punct,
        )
        n, docs = lines.n_docs, np.flatnonzero(fast)
        sentences[docs] = per_doc(lines.doc, per_line, n)[docs].astype(np.int64)
        counts = lines.counts[docs]
        kept = per_doc(lines.doc, per_line > 0, n)[docs]
        kept_frac[docs] = np.divide(kept, counts, out=np.zeros(len(docs)), where=counts > 0)


# Byte classes of a simple line: space or tab, C4's end marks, sentence marks, and what may follow a sentence's
# mark (`_SENTENCE_END`'s look-ahead on ASCII), as 0/1 tables the compiled pass reads without branching.
_SPACE = ascii_table(" \t").astype(np.int64)
_END = ascii_table("".join(C4_END_PUNCT)).astype(np.int64)
_MARK = ascii_table(".!?").astype(np.int64)
_AFTER_MARK = ascii_table(" \t\"')]").astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _count_line(data, a, b, last, space, mark, after):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """(words, longest word, sentence ends) of the line data[a:b]: runs of non-space bytes, and runs of [.!?]
    followed by a space, tab, closing quote or bracket, or ending the stripped line (its last byte `last`)."""
    words = longest = run = found = 0
    prev_space = 1
    for k in range(a, b):
        c = data[k]
        sp = space[c]
        words += prev_space & (1 - sp)
        run = (run + 1) * (1 - sp)
        longest = max(longest, run)
        prev_space = sp
        if mark[c]:
            if k == last or (k + 1 < len(data) and after[data[k + 1]]):
                found += 1
    return words, longest, found


@numba.njit(cache=True, nogil=True)
def _line_sentences(data, offsets, has, first, last, min_words, max_word, terminal):  # noqa: ANN001, ANN202
    """Per simple line: 0 when a line rule drops it, else its sentences (at least 1).

    Words are runs of bytes other than space and tab; with `terminal`, the stripped line ends with one of
    C4's end marks and not with "..."; sentences are counted by `_count_line`.
    """
    out = np.zeros(len(offsets) - 1, np.int64)  # pragma: no cover (compiled)
    for j in range(len(offsets) - 1):
        if terminal:
            if not has[j]:
                continue
            tail = data[last[j]]
            if not _END[tail]:
                continue
            if last[j] - 2 >= first[j] and tail == 46 and data[last[j] - 1] == 46 and data[last[j] - 2] == 46:
                continue
        words, longest, found = _count_line(data, offsets[j], offsets[j + 1], last[j], _SPACE, _MARK, _AFTER_MARK)
        if words < min_words or longest > max_word:
            continue
        out[j] = max(1, found)
    return out
