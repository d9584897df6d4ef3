"""Language identification with py3langid (its model ships inside the package)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.tasks.quality.base import Batch, Check, Rule, RuleFamily


@functools.cache
def _lang_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageRules(RuleFamily):
    """Keep documents in `languages` detected with at least `threshold` probability."""

    name = "language"
    applies_to = "prose"
    signal_fields = ("max_chars",)
    rules = (Rule("lang_below_threshold", "lang_score", "min", "threshold"),)

    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps all")
    threshold: float = Field(0.65, ge=0.0, le=1.0, description="minimum probability of the detected language")
    max_chars: int = Field(2000, ge=50, description="characters read from the start of a document")

    def signals(self, batch: Batch) -> dict[str, Any]:
        ident = _lang_identifier()
        langs, scores = [], np.zeros(len(batch))
        for i, t in enumerate(batch.texts):
            lang, prob = ident.classify(t[: self.max_chars]) if t.strip() else ("und", 0.0)
            langs.append(lang)
            scores[i] = prob
        return {"lang": pa.array(langs, pa.string()), "lang_score": scores}

    def check(self, rule: Rule, signals: pa.Table, limit: Any) -> Check:
        """A document fails when its language is not listed or its score is below the threshold."""
        if not self.languages:  # an empty list keeps every language
            return np.zeros(signals.num_rows, bool), lambda i: ""
        lang = np.array(signals.column("lang").to_pylist(), dtype=object)
        score = signals.column("lang_score").to_numpy()
        fails = ~np.isin(lang, self.languages) | (score < limit)
        return fails, lambda i: (
            f"lang={lang[i]} score={score[i]:.3f} (languages={self.languages}, threshold={limit})"
        )
