"""Decontamination as a rule family: drop documents that share an n-gram with an evaluation set.

It judges every format and is checked first, so a contaminated document is always counted as such.
Reading, hashing and indexing the evaluation sets is `refinery.tasks.decontaminate`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, computed_field, model_validator

from refinery.tasks.decontaminate import decontamination_signals, eval_sets_digest
from refinery.tasks.quality.base import Batch, Rule, RuleFamily


class DecontaminationRules(RuleFamily):
    """Evaluation sets to protect, and how much overlap a training document may have with them."""

    name = "decontamination"
    applies_to = "all"
    rules = (Rule("contaminated", "decontam_ngrams", "max", "max_ngram_matches", "decontam_span"),)

    eval_sets: list[str] = Field(
        default_factory=list,
        description="JSONL, JSON-lines, Parquet or text files, or folders of them; empty turns the rule off",
    )
    text_field: str = Field("text", min_length=1, description="field holding the text in JSONL and Parquet eval sets")
    n: int = Field(13, ge=3, le=64, description="words per n-gram")
    max_ngram_matches: int | None = Field(
        0, ge=0, description="drop a document with more matching n-grams than this; null only flags"
    )

    @model_validator(mode="before")
    @classmethod
    def _ignore_recorded_digest(cls, data: Any) -> Any:
        """A dumped config carries `eval_sets_digest`; it is recomputed, never read back."""
        if isinstance(data, dict) and "eval_sets_digest" in data:
            data = {k: v for k, v in data.items() if k != "eval_sets_digest"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def eval_sets_digest(self) -> str:
        """Checksum of the evaluation files' contents: part of the config hash, so editing an eval set re-runs the filter."""
        return eval_sets_digest(self.eval_sets) if self.active() else ""

    def active(self) -> bool:
        return self.enabled and bool(self.eval_sets)

    def signal_params(self) -> dict[str, Any]:
        """What the cached signals depend on: n, the field, and the eval files' contents."""
        return {"n": self.n, "text_field": self.text_field, "eval_sets": self.eval_sets_digest}

    def signals(self, batch: Batch) -> dict[str, Any]:
        return decontamination_signals(batch.texts, self)
