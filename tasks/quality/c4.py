"""C4 rules (Raffel et al. 2020): line-level rules decide which lines count, document-level rules drop.

The text itself is not rewritten: a line that fails the line rules only stops counting toward sentences.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import Field

from refinery.tasks.quality.base import Batch, Rule, RuleFamily

C4_END_PUNCT = (".", "?", "!", '"', "'")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?…]+(?=[\s\"'”’)\]]|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


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
        texts = batch.texts
        n_docs = len(texts)
        sentences = np.zeros(n_docs, np.int64)
        lorem = np.zeros(n_docs, bool)
        curly = np.zeros(n_docs, bool)
        kept_frac = np.zeros(n_docs)
        for i, t in enumerate(texts):
            lines = t.splitlines()
            kept = 0
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
                    lorem[i] = True
                if self.skip_javascript_lines and "javascript" in low:
                    continue
                if "{" in line:
                    curly[i] = True
                if self.skip_policy_lines and any(p in low for p in _POLICY):
                    continue
                sentences[i] += max(1, len(_SENTENCE_END.findall(line)))
                kept += 1
            kept_frac[i] = kept / len(lines) if lines else 0.0
        return {"c4_sentences": sentences, "c4_lorem_ipsum": lorem, "c4_curly_bracket": curly, "c4_kept_lines_frac": kept_frac}
