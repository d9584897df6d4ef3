"""Keep `unstructured` off the network.

unstructured 0.27 loads the spaCy model `en_core_web_sm` the first time any
partitioner runs, and downloads it from the internet when it is missing, so a
pipeline that runs offline fails on its first DOCX. The model only serves the
heuristics that *label* elements (Title, NarrativeText, ...) through sentence
splitting and part-of-speech tags; the extracted text does not depend on it.

`use_offline_nlp()` replaces unstructured's loader (`unstructured.nlp.tokenize._get_nlp`)
with a rule-based pipeline: `spacy.blank("en")` plus a `sentencizer`. Sentence
splitting then comes from punctuation rules and part-of-speech tags are empty,
so some elements get a different label (more `Text`/`Title`, fewer
`NarrativeText`); Refinery keeps only the text, so documents are unaffected.
It also opts out of unstructured's load-time analytics ping.

The switch is explicit: call it once before the first partition call (the
ingest readers do). `offline_nlp_enabled()` tells whether it is in place.
"""

from __future__ import annotations

import functools
import os
import threading

_lock = threading.Lock()
_enabled = False

# unstructured pings an analytics endpoint on import unless one of these is set.
_TELEMETRY_OPT_OUT = {"DO_NOT_TRACK": "true", "SCARF_NO_ANALYTICS": "true", "UNSTRUCTURED_DISABLE_NOTICE": "1"}


@functools.lru_cache(maxsize=1)
def blank_english():  # noqa: ANN201 (spacy.language.Language; spaCy imported lazily)
    """A model-free English pipeline: tokenizer from rules, sentences from punctuation."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def use_offline_nlp() -> None:
    """Make unstructured use `blank_english()` instead of downloading `en_core_web_sm`.

    Idempotent and thread-safe; call it before importing partitioners in a new process.
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        for key, value in _TELEMETRY_OPT_OUT.items():
            os.environ.setdefault(key, value)
        from unstructured.nlp import tokenize

        tokenize._get_nlp = blank_english
        # Results cached from an earlier (online) pipeline would mix two labelers.
        for cached in ("_process_cached", "_tokenize_for_cache", "word_tokenize", "pos_tag"):
            fn = getattr(tokenize, cached, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
        _enabled = True


def offline_nlp_enabled() -> bool:
    return _enabled
