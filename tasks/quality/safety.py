"""Safety as a rule family: word and domain block lists and a toxicity classifier, with per-rule reasons.

It judges every format and is checked right after decontamination, before the quality families, so a
blocked document is always counted as such. The lists, the matching and the classifier are
`refinery.tasks.safety`; the defaults were chosen from `python -m bench.safety` (see docs/trust.md).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, computed_field, model_validator

from refinery.tasks.quality.base import Batch, Rule, RuleFamily
from refinery.tasks.safety import BlockLists, load_lists, safety_signals

# Defaults chosen from the labelled set's figures in bench/RESULTS.md (docs/trust.md says why): the classifier
# drops above 0.9; the word list only counts (`max_word_hits: null`), its any-match rule flags too many
# medical, legal and scholarly documents to be on by default.
TOXICITY_THRESHOLD = 0.9


class SafetyRules(RuleFamily):
    """Block lists, the toxicity classifier and their thresholds. A `null` threshold turns that rule off."""

    name = "safety"
    applies_to = "all"
    inputs = ("meta",)  # the domain rule reads the `url` in a document's meta
    rules = (
        Rule(
            "safety_blocked_domain",
            "safety_blocked_domain",
            "flag",
            "drop_blocked_domains",
            "safety_url_host",
        ),
        Rule("safety_blocked_url_in_text", "safety_blocked_text_urls", "max", "max_blocked_text_urls"),
        Rule("safety_blocklist_word", "safety_word_hits", "max", "max_word_hits", "safety_first_word"),
        Rule("safety_blocklist_word", "safety_word_frac", "max", "max_word_frac", "safety_first_word"),
        Rule("safety_toxicity", "toxicity", "max", "max_toxicity"),
    )

    words_file: str | None = Field(None, description="word/phrase list, one per line; replaces word_lists")
    word_lists: list[str] = Field(
        default_factory=lambda: ["en"], description="bundled LDNOOBW lists by language code"
    )
    extra_words: list[str] = Field(default_factory=list, description="terms added to the list")
    max_word_hits: int | None = Field(
        None, ge=0, description="drop a document with more block-list matches than this; null: count only"
    )
    max_word_frac: float | None = Field(
        None, ge=0, le=1, description="drop when matches / words exceeds this"
    )
    domains_file: str | None = Field(None, description="domain list, one per line; default: the bundled list")
    extra_domains: list[str] = Field(default_factory=list, description="domains added to the list")
    drop_blocked_domains: bool = Field(
        True, description="drop documents whose meta url is on a blocked domain"
    )
    check_text_urls: bool = Field(False, description="also look for blocked URLs written in the text")
    max_blocked_text_urls: int | None = Field(
        0, ge=0, description="drop when more blocked URLs are in the text"
    )
    toxicity: bool = Field(
        True, description="score documents with the offline classifier (`toxicity` column)"
    )
    max_toxicity: float | None = Field(
        TOXICITY_THRESHOLD,
        ge=0,
        le=1,
        description="drop when the toxicity score exceeds this; null: score only",
    )

    @model_validator(mode="before")
    @classmethod
    def _ignore_recorded_digest(cls, data: Any) -> Any:
        """A dumped config carries `lists_digest`; it is recomputed, never read back."""
        if isinstance(data, dict) and "lists_digest" in data:
            data = {k: v for k, v in data.items() if k != "lists_digest"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lists_digest(self) -> str:
        """Checksum of the block lists' contents: part of the config hash, so editing a list re-runs the filter."""
        return self.lists().digest if self.enabled else ""

    def lists(self) -> BlockLists:
        return load_lists(
            self.words_file, self.domains_file, self.extra_words, self.extra_domains, self.word_lists
        )

    def signal_params(self) -> dict[str, Any]:
        """What the cached signals depend on: the lists' contents (not their paths), text URL checking and
        whether the classifier runs; not `max_toxicity`, so a new threshold re-runs only the selection."""
        return {
            "lists": self.lists_digest,
            "check_text_urls": self.check_text_urls,
            "toxicity": self.toxicity,
        }

    def signals(self, batch: Batch) -> dict[str, Any]:
        # the Arrow texts, not `batch.texts`: only the few documents a phrase or URL may be in become `str`
        return safety_signals(batch.arr, batch.column("meta"), self, batch.arr, batch.words)
