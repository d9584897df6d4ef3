"""Quality rules: their settings, the signals they read, and the thresholds they apply.

Signals are pure functions of a document (word counts, ratios, language
scores) computed once per batch and stored as columns; `RULES` then says, for
each reason code, which column is compared with which config threshold. The
filter stage caches the signals and re-runs only the cheap comparison when a
threshold changes.

Words are whitespace-separated tokens, as in the Gopher paper (a token like
"end." is one word that contains letters), not the output of a linguistic
tokenizer that splits punctuation into words of its own.

Prose rules (Gopher, C4, FineWeb, language) apply to every format except
`code`; code documents get the code rules instead.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from refinery.tasks.decontaminate import decontamination_signals
from refinery.tasks.safety import safety_signals

# --------------------------------------------------------------------------- settings


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields that change the signals themselves (the rest are thresholds, applied by selection only).
    signal_fields: ClassVar[tuple[str, ...]] = ()

    enabled: bool = True

    def active(self) -> bool:
        """Whether the family runs (a family may also need settings, e.g. evaluation sets, to apply)."""
        return self.enabled

    def signal_params(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.signal_fields}


class LanguageRules(_Rules):
    """Language identification with py3langid (its model ships inside the package)."""

    signal_fields: ClassVar[tuple[str, ...]] = ("max_chars",)
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps all")
    threshold: float = Field(0.65, ge=0.0, le=1.0, description="minimum probability of the detected language")
    max_chars: int = Field(2000, ge=50, description="characters read from the start of a document")


STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


class GopherQualityRules(_Rules):
    """Gopher quality rules (Rae et al. 2021, appendix A)."""

    signal_fields: ClassVar[tuple[str, ...]] = ("stop_words",)
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_frac: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_frac: float = Field(0.3, ge=0, le=1)
    min_alpha_words_frac: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0)
    stop_words: list[str] = Field(default_factory=lambda: list(STOP_WORDS))


class GopherRepetitionRules(_Rules):
    """Gopher repetition rules: duplicated lines, paragraphs and n-grams."""

    max_dup_para_frac: float = Field(0.3, ge=0, le=1)
    max_dup_para_char_frac: float = Field(0.2, ge=0, le=1)
    max_dup_line_frac: float = Field(0.3, ge=0, le=1)
    max_dup_line_char_frac: float = Field(0.2, ge=0, le=1)
    max_top_2gram_char_frac: float = Field(0.20, ge=0, le=1)
    max_top_3gram_char_frac: float = Field(0.18, ge=0, le=1)
    max_top_4gram_char_frac: float = Field(0.16, ge=0, le=1)
    max_dup_5gram_char_frac: float = Field(0.15, ge=0, le=1)
    max_dup_6gram_char_frac: float = Field(0.14, ge=0, le=1)
    max_dup_7gram_char_frac: float = Field(0.13, ge=0, le=1)
    max_dup_8gram_char_frac: float = Field(0.12, ge=0, le=1)
    max_dup_9gram_char_frac: float = Field(0.11, ge=0, le=1)
    max_dup_10gram_char_frac: float = Field(0.10, ge=0, le=1)


class C4Rules(_Rules):
    """C4 rules (Raffel et al. 2020): line-level rules decide which lines count, document-level rules drop."""

    signal_fields: ClassVar[tuple[str, ...]] = (
        "remove_citations", "require_terminal_punct", "min_words_per_line", "max_word_length",
        "skip_javascript_lines", "skip_policy_lines",
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


class FineWebRules(_Rules):
    """FineWeb quality rules (Penedo et al. 2024)."""

    signal_fields: ClassVar[tuple[str, ...]] = ("short_line_length",)
    min_line_punct_frac: float = Field(0.12, ge=0, le=1)
    max_short_line_frac: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=1)
    max_dup_line_char_frac: float = Field(0.01, ge=0, le=1)
    max_newline_word_ratio: float = Field(0.3, ge=0)


AUTOGEN_MARKERS = [
    "auto-generated", "autogenerated", "automatically generated", "generated by", "do not edit",
    "code generated", "this file is generated",
]


class CodeRules(_Rules):
    """Rules for source code (`format == "code"`), in the spirit of The Stack and StarCoder."""

    signal_fields: ClassVar[tuple[str, ...]] = ("autogen_markers", "header_lines")
    max_line_length: int = Field(1000, ge=1)
    max_mean_line_length: float = Field(100.0, ge=1)
    min_alnum_frac: float = Field(0.25, ge=0, le=1)
    drop_autogenerated: bool = True
    autogen_markers: list[str] = Field(default_factory=lambda: list(AUTOGEN_MARKERS))
    header_lines: int = Field(5, ge=1, description="lines at the top searched for auto-generated markers")


# --------------------------------------------------------------------------- rules table


@dataclass(frozen=True)
class Rule:
    """One reason code: drop a document when `column` compares badly with the config field `limit`."""

    code: str
    family: Literal[
        "language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "code", "decontamination", "safety"
    ]
    column: str
    op: Literal["min", "max", "flag"]  # min: drop below; max: drop above; flag: drop when true (and limit set)
    limit: str  # a config field; a `None` value there turns the rule off
    detail_column: str | None = None  # a signal column shown in the drop's detail (e.g. the matched span)


def _gopher_rep_rules() -> list[Rule]:
    rules = [
        Rule("gopher_dup_para_frac", "gopher_repetition", "gopher_dup_para_frac", "max", "max_dup_para_frac"),
        Rule("gopher_dup_para_chars", "gopher_repetition", "gopher_dup_para_char_frac", "max", "max_dup_para_char_frac"),
        Rule("gopher_dup_line_frac", "gopher_repetition", "gopher_dup_line_frac", "max", "max_dup_line_frac"),
        Rule("gopher_dup_line_chars", "gopher_repetition", "gopher_dup_line_char_frac", "max", "max_dup_line_char_frac"),
    ]
    rules += [
        Rule(f"gopher_top_{n}gram", "gopher_repetition", f"gopher_top_{n}gram_char_frac", "max", f"max_top_{n}gram_char_frac")
        for n in TOP_NGRAMS
    ]
    rules += [
        Rule(f"gopher_dup_{n}gram", "gopher_repetition", f"gopher_dup_{n}gram_char_frac", "max", f"max_dup_{n}gram_char_frac")
        for n in DUP_NGRAMS
    ]
    return rules


TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)

# Applied in this order; a dropped document is counted under the first rule it fails.
RULES: list[Rule] = [
    Rule("lang_below_threshold", "language", "lang_score", "min", "threshold"),
    Rule("gopher_word_count", "gopher_quality", "gopher_words", "min", "min_words"),
    Rule("gopher_word_count", "gopher_quality", "gopher_words", "max", "max_words"),
    Rule("gopher_mean_word_length", "gopher_quality", "gopher_mean_word_length", "min", "min_mean_word_length"),
    Rule("gopher_mean_word_length", "gopher_quality", "gopher_mean_word_length", "max", "max_mean_word_length"),
    Rule("gopher_symbol_word_ratio", "gopher_quality", "gopher_symbol_word_ratio", "max", "max_symbol_word_ratio"),
    Rule("gopher_bullet_lines", "gopher_quality", "gopher_bullet_lines_frac", "max", "max_bullet_lines_frac"),
    Rule("gopher_ellipsis_lines", "gopher_quality", "gopher_ellipsis_lines_frac", "max", "max_ellipsis_lines_frac"),
    Rule("gopher_alpha_words", "gopher_quality", "gopher_alpha_words_frac", "min", "min_alpha_words_frac"),
    Rule("gopher_stop_words", "gopher_quality", "gopher_stop_words", "min", "min_stop_words"),
    *_gopher_rep_rules(),
    Rule("c4_lorem_ipsum", "c4", "c4_lorem_ipsum", "flag", "drop_lorem_ipsum"),
    Rule("c4_curly_bracket", "c4", "c4_curly_bracket", "flag", "drop_curly_bracket"),
    Rule("c4_too_few_sentences", "c4", "c4_sentences", "min", "min_sentences"),
    Rule("fineweb_line_punct", "fineweb", "fineweb_line_punct_frac", "min", "min_line_punct_frac"),
    Rule("fineweb_short_lines", "fineweb", "fineweb_short_line_frac", "max", "max_short_line_frac"),
    Rule("fineweb_dup_line_chars", "fineweb", "fineweb_dup_line_char_frac", "max", "max_dup_line_char_frac"),
    Rule("fineweb_list_like", "fineweb", "fineweb_newline_word_ratio", "max", "max_newline_word_ratio"),
    Rule("code_max_line_length", "code", "code_max_line_length", "max", "max_line_length"),
    Rule("code_mean_line_length", "code", "code_mean_line_length", "max", "max_mean_line_length"),
    Rule("code_alnum_frac", "code", "code_alnum_frac", "min", "min_alnum_frac"),
    Rule("code_autogenerated", "code", "code_autogenerated", "flag", "drop_autogenerated"),
]

# Trust rules (decontamination, safety) apply to every format and come before the quality rules,
# so a contaminated or blocked document is always counted under that reason.
TRUST_RULES: list[Rule] = [
    Rule("contaminated", "decontamination", "decontam_ngrams", "max", "max_ngram_matches", "decontam_span"),
    Rule("safety_blocked_domain", "safety", "safety_blocked_domain", "flag", "drop_blocked_domains", "safety_url_host"),
    Rule("safety_blocked_url_in_text", "safety", "safety_blocked_text_urls", "max", "max_blocked_text_urls"),
    Rule("safety_blocklist_word", "safety", "safety_word_hits", "max", "max_word_hits", "safety_first_word"),
    Rule("safety_blocklist_word", "safety", "safety_word_frac", "max", "max_word_frac", "safety_first_word"),
]
TRUST_FAMILIES = ("decontamination", "safety")

# --------------------------------------------------------------------------- shared helpers

_TRIM = string.punctuation + "“”‘’«»…—–·•"
# Sentence-final punctuation; a line ending in `."` or `?)` ends a sentence, one ending in `('x')` does not.
TERMINAL_PUNCT = (".", "!", "?", "…", "。", "！", "？", "‼", "‽", "⁇", "⁈", "⁉", "।", "؟", "۔")
_CLOSERS = "\"'”’»)]"
C4_END_PUNCT = (".", "?", "!", '"', "'")
_PARA_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?…]+(?=[\s\"'”’)\]]|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@dataclass
class _Words:
    """Whitespace words of a batch, flattened, with the document each belongs to."""

    tokens: pa.Array
    doc: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    n_docs: int

    @classmethod
    def split(cls, texts: pa.Array) -> _Words:
        lists = pc.utf8_split_whitespace(texts)
        offsets = lists.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        counts = np.diff(offsets)
        return cls(lists.flatten(), np.repeat(np.arange(len(texts)), counts), counts, offsets, len(texts))

    def per_doc_sum(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.doc, weights=values, minlength=self.n_docs)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them): every occurrence after the first counts."""
    seen: set[str] = set()
    dup = chars = 0
    for x in items:
        if x in seen:
            dup += 1
            chars += len(x)
        else:
            seen.add(x)
    return dup, chars


# --------------------------------------------------------------------------- signal families


@functools.cache
def _lang_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_signals(texts: list[str], rules: LanguageRules) -> dict[str, Any]:
    ident = _lang_identifier()
    langs, scores = [], np.zeros(len(texts))
    for i, t in enumerate(texts):
        lang, prob = ident.classify(t[: rules.max_chars]) if t.strip() else ("und", 0.0)
        langs.append(lang)
        scores[i] = prob
    return {"lang": pa.array(langs, pa.string()), "lang_score": scores}


def gopher_quality_signals(texts: list[str], words: _Words, rules: GopherQualityRules) -> dict[str, np.ndarray]:
    tok = words.tokens
    symbol = pc.match_substring_regex(tok, r"^[\p{P}\p{S}]+$").to_numpy(zero_copy_only=False)
    alpha = pc.match_substring_regex(tok, r"\p{L}").to_numpy(zero_copy_only=False)
    trimmed = pc.utf8_trim(tok, _TRIM)
    lengths = pc.utf8_length(trimmed).to_numpy(zero_copy_only=False).astype(np.float64)
    n_all = words.counts.astype(np.float64)
    n_words = words.per_doc_sum(~symbol)
    stop = pc.index_in(pc.utf8_lower(trimmed), value_set=pa.array(rules.stop_words, pa.string()))
    stop_idx = stop.fill_null(-1).to_numpy(zero_copy_only=False)
    hit = stop_idx >= 0
    distinct = np.unique(words.doc[hit].astype(np.int64) * (len(rules.stop_words) + 1) + stop_idx[hit])
    n_stop = np.bincount(distinct // (len(rules.stop_words) + 1), minlength=words.n_docs)

    symbols = np.zeros(len(texts))
    bullets = np.zeros(len(texts))
    ellipsis_lines = np.zeros(len(texts))
    for i, t in enumerate(texts):
        symbols[i] = max(t.count("#"), t.count("...") + t.count("…"))
        lines = t.splitlines()
        if lines:
            bullets[i] = sum(1 for s in lines if s.lstrip().startswith(("•", "-", "*", "‣", "–"))) / len(lines)
            ellipsis_lines[i] = sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / len(lines)
    return {
        "gopher_words": n_words.astype(np.int64),
        "gopher_mean_word_length": _ratio(words.per_doc_sum(np.where(symbol, 0.0, lengths)), n_words),
        "gopher_symbol_word_ratio": _ratio(symbols, n_all),
        "gopher_bullet_lines_frac": bullets,
        "gopher_ellipsis_lines_frac": ellipsis_lines,
        "gopher_alpha_words_frac": _ratio(words.per_doc_sum(alpha), n_all),
        "gopher_stop_words": n_stop.astype(np.int64),
    }


def _ngram_keys(ids: np.ndarray, words: _Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash keys of the word n-grams that stay inside one document, and their start positions."""
    total = len(ids)
    pos_in_doc = np.arange(total) - words.offsets[:-1][words.doc]
    valid = np.flatnonzero(pos_in_doc <= words.counts[words.doc] - n)
    key = (words.doc[valid].astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    for k in range(n):
        key = (key ^ ids[valid + k].astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(31)
    return key, valid


def gopher_repetition_signals(texts: list[str], words: _Words) -> dict[str, np.ndarray]:
    n_docs = len(texts)
    out: dict[str, np.ndarray] = {}
    para_frac, para_chars, line_frac, line_chars = (np.zeros(n_docs) for _ in range(4))
    text_len = np.array([len(t) for t in texts], dtype=np.float64)
    for i, t in enumerate(texts):
        if not t:
            continue
        paras = _PARA_SPLIT.split(t.strip())
        dup, chars = _find_duplicates(paras)
        para_frac[i], para_chars[i] = dup / len(paras), chars / len(t)
        lines = _LINE_SPLIT.split(t)
        dup, chars = _find_duplicates(lines)
        line_frac[i], line_chars[i] = dup / len(lines), chars / len(t)
    out.update(
        gopher_dup_para_frac=para_frac, gopher_dup_para_char_frac=para_chars,
        gopher_dup_line_frac=line_frac, gopher_dup_line_char_frac=line_chars,
    )
    ids = pc.dictionary_encode(words.tokens).indices.to_numpy(zero_copy_only=False) if len(words.tokens) else np.empty(0, np.int32)
    wlen = pc.utf8_length(words.tokens).to_numpy(zero_copy_only=False).astype(np.float64) if len(words.tokens) else np.empty(0)
    cum = np.concatenate([[0.0], np.cumsum(wlen)])
    for n in TOP_NGRAMS:
        # The most frequent n-gram's characters (words joined by spaces) times its count.
        key, start = _ngram_keys(ids, words, n)
        top = np.zeros(n_docs)
        if len(key):
            _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
            occ = counts[inverse]
            doc = words.doc[start]
            best = np.zeros(n_docs, np.int64)
            np.maximum.at(best, doc, occ)
            at_best = np.flatnonzero(occ == best[doc])
            first_doc, first = np.unique(doc[at_best], return_index=True)
            s = start[at_best[first]]
            chars = cum[s + n] - cum[s] + (n - 1)
            top[first_doc] = best[first_doc] * chars
        out[f"gopher_top_{n}gram_char_frac"] = _ratio(top, text_len)
    for n in DUP_NGRAMS:
        # Characters of the words covered by any repeated occurrence of an n-gram.
        key, start = _ngram_keys(ids, words, n)
        dup_chars = np.zeros(n_docs)
        if len(key):
            _, first = np.unique(key, return_index=True)
            repeated = np.ones(len(key), bool)
            repeated[first] = False
            rs = start[repeated]
            cover = np.zeros(len(ids) + 1, np.int64)
            np.add.at(cover, rs, 1)
            np.add.at(cover, rs + n, -1)
            covered = np.cumsum(cover[:-1]) > 0
            dup_chars = words.per_doc_sum(np.where(covered, wlen, 0.0))
        out[f"gopher_dup_{n}gram_char_frac"] = _ratio(dup_chars, text_len)
    return out


def c4_signals(texts: list[str], rules: C4Rules) -> dict[str, np.ndarray]:
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
            if any(len(w) > rules.max_word_length for w in line_words):
                continue
            if rules.remove_citations:
                line = _CITATION.sub("", line)
            if rules.require_terminal_punct and (not line.endswith(C4_END_PUNCT) or line.endswith("...")):
                continue
            if len(line_words) < rules.min_words_per_line:
                continue
            low = line.lower()
            if "lorem ipsum" in low:
                lorem[i] = True
            if rules.skip_javascript_lines and "javascript" in low:
                continue
            if "{" in line:
                curly[i] = True
            if rules.skip_policy_lines and any(p in low for p in _POLICY):
                continue
            sentences[i] += max(1, len(_SENTENCE_END.findall(line)))
            kept += 1
        kept_frac[i] = kept / len(lines) if lines else 0.0
    return {"c4_sentences": sentences, "c4_lorem_ipsum": lorem, "c4_curly_bracket": curly, "c4_kept_lines_frac": kept_frac}


def fineweb_signals(texts: list[str], words: _Words, rules: FineWebRules) -> dict[str, np.ndarray]:
    n_docs = len(texts)
    punct, short, dup_chars, newline = (np.zeros(n_docs) for _ in range(4))
    for i, t in enumerate(texts):
        lines = [ln for ln in t.split("\n") if ln.strip()]
        if not lines:
            continue
        punct[i] = sum(1 for ln in lines if ln.rstrip().rstrip(_CLOSERS).endswith(TERMINAL_PUNCT)) / len(lines)
        short[i] = sum(1 for ln in lines if len(ln) <= rules.short_line_length) / len(lines)
        flat_len = len(t) - t.count("\n")
        dup_chars[i] = _find_duplicates(lines)[1] / flat_len if flat_len else 0.0
        newline[i] = t.count("\n")
    return {
        "fineweb_line_punct_frac": punct,
        "fineweb_short_line_frac": short,
        "fineweb_dup_line_char_frac": dup_chars,
        "fineweb_newline_word_ratio": _ratio(newline, words.counts),
    }


def code_signals(texts: list[str], arr: pa.Array, rules: CodeRules) -> dict[str, np.ndarray]:
    n_docs = len(texts)
    max_len = np.zeros(n_docs, np.int64)
    mean_len = np.zeros(n_docs)
    autogen = np.zeros(n_docs, bool)
    markers = [m.lower() for m in rules.autogen_markers]
    for i, t in enumerate(texts):
        lines = t.splitlines()
        if lines:
            lens = [len(ln) for ln in lines]
            max_len[i] = max(lens)
            mean_len[i] = sum(lens) / len(lens)
            head = "\n".join(lines[: rules.header_lines]).lower()
            autogen[i] = any(m in head for m in markers)
    alnum = pc.count_substring_regex(arr, r"[\p{L}\p{N}]").to_numpy(zero_copy_only=False)
    length = pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    return {
        "code_max_line_length": max_len,
        "code_mean_line_length": mean_len,
        "code_alnum_frac": _ratio(alnum, length),
        "code_autogenerated": autogen,
    }


def compute_signals(texts: pa.Array, families: dict[str, Any], metas: pa.Array | None = None) -> dict[str, Any]:
    """Every signal column of the enabled `families` for a batch of texts (pure; safe in any worker).

    `metas` (the documents' `meta` JSON) is read only by the safety family's domain check.
    """
    arr = texts.cast(pa.large_string())
    py = arr.to_pylist()
    out: dict[str, Any] = {}
    if "decontamination" in families:
        out.update(decontamination_signals(py, families["decontamination"]))
    if "safety" in families:
        out.update(safety_signals(py, metas.to_pylist() if metas is not None else None, families["safety"]))
    need_words = any(f in families for f in ("gopher_quality", "gopher_repetition", "fineweb"))
    words = _Words.split(arr) if need_words else None
    if "language" in families:
        out.update(language_signals(py, families["language"]))  # type: ignore[arg-type]
    if "gopher_quality" in families:
        out.update(gopher_quality_signals(py, words, families["gopher_quality"]))  # type: ignore[arg-type]
    if "gopher_repetition" in families:
        out.update(gopher_repetition_signals(py, words))  # type: ignore[arg-type]
    if "c4" in families:
        out.update(c4_signals(py, families["c4"]))  # type: ignore[arg-type]
    if "fineweb" in families:
        out.update(fineweb_signals(py, words, families["fineweb"]))  # type: ignore[arg-type]
    if "code" in families:
        out.update(code_signals(py, arr, families["code"]))  # type: ignore[arg-type]
    return out

