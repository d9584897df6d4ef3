"""Safety filters: word and URL/domain block lists and an offline toxicity classifier, as filter signals.

The lists are plain files the user can replace (`filter.safety.words_file`,
`filter.safety.domains_file`) or extend (`extra_words`, `extra_domains`). The
bundled defaults in `tasks/data/` are public lists (sources, commits and
licences in `tasks/data/README.md`): the LDNOOBW word lists, one file per
language (`word_lists` picks them; English by default), and a subset of the
UT1 domain blacklists.

- Words: whole-word, case-insensitive matches ("Scunthorpe", "assessment" and
  "cocktail" do not contain a match). Documents are split into lower-cased
  words exactly as decontamination splits them (runs of letters, digits, marks
  and underscores, with Arrow) and single-word terms are looked up in one
  vectorised `is_in`. A phrase ("date rape", "s&m") is matched by one compiled
  regular expression with word boundaries, spaces matching any run of
  whitespace, searched only in the documents a vectorised pass finds its
  words in sequence in (or, for phrases with punctuation, Arrow's regex
  engine finds it in). The signals are the number of matches and their
  fraction of the document's words (`safety_blocklist_word`).
- Domains: a listed domain blocks itself and every subdomain. A document whose
  `meta` has a `url` (WARC records) on a blocked domain is dropped
  (`safety_blocked_domain`); with `check_text_urls`, URLs written in the text
  are checked too (`safety_blocked_url_in_text`).
- Toxicity: `alt-profanity-check`'s linear model (word counts and a calibrated
  linear SVM, shipped inside the package, no download) scores each document
  in one vectorised call per batch; the score is the `toxicity` column and
  `max_toxicity` decides (`safety_toxicity`), so changing it re-runs only the
  selection.

The rule family (settings, rules, which documents it judges) is `refinery.tasks.quality.safety`;
this module holds the lists, the matching and the classifier call.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.tasks.decontaminate import split_words

if TYPE_CHECKING:
    from refinery.tasks.quality.safety import SafetyRules

DATA_DIR = Path(__file__).with_name("data")
WORD_LISTS = DATA_DIR / "badwords"
DEFAULT_WORDS = WORD_LISTS / "en.txt"
DEFAULT_DOMAINS = DATA_DIR / "ut1_domains.txt.gz"
_WORD = re.compile(r"\w+")
_SPACE = pa.scalar(" ", pa.large_string())
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


def _split_words(texts: Sequence[str | None]) -> tuple[pa.Array, np.ndarray]:
    """`decontaminate.split_words`: ASCII texts split with numpy over their bytes, the others with Arrow."""
    from refinery.tasks.quality._text import ascii_words  # here: the quality package imports this module

    arr = pc.fill_null(pa.array(texts, pa.large_string()), "")
    is_ascii = np.asarray(pc.string_is_ascii(arr).to_numpy(zero_copy_only=False), bool)
    fast, slow = np.flatnonzero(is_ascii), np.flatnonzero(~is_ascii)
    words, doc = ascii_words(arr.take(pa.array(fast)))
    doc = fast[doc]
    if len(slow):
        other, starts = split_words(arr.take(pa.array(slow)).to_pylist())
        order = np.argsort(np.concatenate([doc, np.repeat(slow, np.diff(starts))]), kind="stable")
        words = pa.concat_arrays([words, other.cast(pa.large_string())]).take(pa.array(order))
        doc = np.concatenate([doc, np.repeat(slow, np.diff(starts))])[order]
    starts = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.bincount(doc, minlength=len(texts)), out=starts[1:])
    return words, starts


def bundled_word_list(code: str) -> Path:
    """The bundled LDNOOBW list of a language code (`en`, `de`, ...), naming the available codes if absent."""
    path = WORD_LISTS / f"{code}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in WORD_LISTS.glob("*.txt")))
        raise FileNotFoundError(
            f"no bundled word list {code!r} in filter.safety.word_lists; bundled: {known}"
        )
    return path


def load_lists(
    words_file: str | Path | None = None,
    domains_file: str | Path | None = None,
    extra_words: Sequence[str] = (),
    extra_domains: Sequence[str] = (),
    word_lists: Sequence[str] = ("en",),
) -> BlockLists:
    """The block lists plus extra terms, loaded once per process until a file changes.

    `words_file` replaces the bundled word lists named by `word_lists`; `domains_file` the bundled domains.
    """
    words = [words_file] if words_file else [bundled_word_list(c) for c in word_lists]
    files = (tuple(_stat(w) for w in words), _stat(domains_file or DEFAULT_DOMAINS))
    return BlockLists.load(*files, tuple(extra_words), tuple(extra_domains))


def _stat(path: str | Path) -> tuple[str, int, int]:
    """(path, size, mtime): the cache key of a loaded list, so an edited file is read again."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"block list {p} does not exist; fix filter.safety.words_file/domains_file")
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def read_list(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a block-list file (plain UTF-8 or gzip, by its `.gz` name), stripped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"block list {p} does not exist; fix filter.safety.words_file/domains_file")
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    lines = (line.strip() for line in raw.decode("utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def normalize_domain(domain: str) -> str:
    """`https://WWW.Example.com/x` or `.example.com` -> `example.com`."""
    d = domain.strip().lower()
    if "//" in d:
        d = urlsplit(d).hostname or ""
    d = d.strip(".").split("/")[0]
    return d[4:] if d.startswith("www.") else d


def host_of(url: str) -> str:
    if not url.lower().startswith(("http://", "https://", "ftp://", "//")):
        url = "//" + url
    try:
        return (urlsplit(url).hostname or "").lower().strip(".")
    except ValueError:
        return ""


@dataclass(frozen=True)
class BlockLists:
    """The loaded lists, ready to match."""

    words: frozenset[str]
    ngrams: dict[
        int, frozenset[str]
    ]  # phrases of plain words by length ("date rape" under 2), to pick documents
    phrases: re.Pattern[str] | None  # every phrase, with word boundaries and any whitespace between its words
    phrase_filter: (
        str  # the phrases with punctuation ("s&m", "g-spot"), for Arrow's regex engine to pick documents
    )
    domains: frozenset[str]
    digest: str

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def load(
        words_files: tuple[tuple[str, int, int], ...],
        domains_file: tuple[str, int, int],
        extra_words: tuple[str, ...],
        extra_domains: tuple[str, ...],
    ) -> BlockLists:
        listed = [t for f in words_files for t in read_list(f[0])]
        terms = sorted({" ".join(t.lower().split()) for t in [*listed, *extra_words] if t.strip()})
        domains = sorted({normalize_domain(d) for d in [*read_list(domains_file[0]), *extra_domains]} - {""})
        digest = hashlib.sha256(json.dumps([terms, domains]).encode()).hexdigest()
        single = frozenset(t for t in terms if _WORD.fullmatch(t))
        multi = [t for t in terms if t not in single]
        # Every phrase is one alternative of a regular expression with word boundaries, searched only in the
        # documents a cheap vectorised pass picks: those holding the phrase's words in sequence (phrases
        # whose words split as documents are split) or matching Arrow's regex engine (the others).
        words, starts = split_words(multi)
        split = [
            " ".join(words.slice(starts[i], starts[i + 1] - starts[i]).to_pylist()) for i in range(len(multi))
        ]
        by_len: dict[int, set[str]] = {}
        odd = []
        for term, joined in zip(multi, split, strict=True):
            if joined == term:
                by_len.setdefault(term.count(" ") + 1, set()).add(term)
            else:
                odd.append(term)
        phrases = None
        if multi:
            alts = [
                r"\s+".join(re.escape(p) for p in t.split()) for t in sorted(multi, key=len, reverse=True)
            ]
            phrases = re.compile(rf"(?<!\w)(?:{'|'.join(alts)})(?!\w)", re.IGNORECASE)
        odd_filter = "|".join(r"\s+".join(re.escape(p) for p in t.split()) for t in odd)
        ngrams = {k: frozenset(v) for k, v in sorted(by_len.items())}
        return BlockLists(single, ngrams, phrases, odd_filter, frozenset(domains), digest)

    def word_hits(
        self, texts: Sequence[str | None], split: tuple[pa.Array, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per document: block-list matches, words, and the term shown in a drop's detail.

        Single words are one `is_in` over all words of the batch; phrases are searched for only in the
        documents holding their words in sequence (one `is_in` over the batch's k-word sequences that
        start with a phrase's first word), so the regular expression sees few documents. The term shown is
        the first phrase found, else the earliest listed word. `split` is `_split_words(texts)` when the
        caller has it.
        """
        words, starts = split if split is not None else _split_words(texts)
        n = len(texts)
        counts = np.diff(starts)
        doc = np.repeat(np.arange(n), counts)
        hits = np.zeros(n, np.int64)
        first = [""] * n
        if self.words and len(words):
            listed = pc.is_in(words, value_set=pa.array(sorted(self.words), pa.large_string()))
            hit_at = np.flatnonzero(listed.to_numpy(zero_copy_only=False))
            hits += np.bincount(doc[hit_at], minlength=n)
            docs, j = np.unique(doc[hit_at], return_index=True)  # each document's earliest match
            for d, w in zip(docs.tolist(), words.take(pa.array(hit_at[j])).to_pylist(), strict=True):
                first[d] = w
        if self.phrases is None or not n:
            return hits, counts, first
        candidates = np.zeros(n, bool)
        for k, terms in self.ngrams.items():
            m = len(words) - k + 1
            if m <= 0:
                continue
            heads = pa.array(sorted({t.split(" ", 1)[0] for t in terms}), pa.large_string())
            starts_ok = pc.is_in(words.slice(0, m), value_set=heads).to_numpy(zero_copy_only=False)
            at = np.flatnonzero(starts_ok & (doc[:m] == doc[k - 1 :]))  # k words inside one document
            if not len(at):
                continue
            grams = words.take(pa.array(at))
            for j in range(1, k):
                grams = pc.binary_join_element_wise(grams, words.take(pa.array(at + j)), _SPACE)
            listed = pc.is_in(grams, value_set=pa.array(sorted(terms), pa.large_string()))
            candidates[doc[at[listed.to_numpy(zero_copy_only=False)]]] = True
        if self.phrase_filter:
            arr = pc.fill_null(pa.array(texts, pa.large_string()), "")
            candidates |= pc.match_substring_regex(arr, self.phrase_filter, ignore_case=True).to_numpy(
                zero_copy_only=False
            )
        for i in np.flatnonzero(candidates).tolist():
            found = self.phrases.findall(texts[i] or "")
            if found:
                hits[i] += len(found)
                first[i] = " ".join(found[0].lower().split())
        return hits, counts, first

    def blocked_host(self, host: str) -> bool:
        """True if `host` or any parent domain of it is listed."""
        if host.startswith("www."):
            host = host[4:]
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))


def _meta_url(meta: str | None) -> str:
    if not meta or '"url"' not in meta:
        return ""
    try:
        value = json.loads(meta).get("url")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


@functools.cache
def _toxicity_model() -> tuple[Any, Any, pa.Array | None, np.ndarray]:
    """`alt-profanity-check`'s vectorizer and model, and what the vectorised counting needs (None: unusable).

    The counting below reproduces `TfidfVectorizer`'s own for the settings the shipped vectorizer has; a
    vectorizer with other settings is only ever called through scikit-learn.
    """
    from profanity_check.profanity_check import model, vectorizer

    params = vectorizer.get_params()
    expected = {"analyzer": "word", "lowercase": True, "ngram_range": (1, 1), "preprocessor": None,
                "tokenizer": None, "strip_accents": None, "token_pattern": r"(?u)\b\w\w+\b", "binary": False,
                "use_idf": True, "sublinear_tf": False, "norm": "l2"}  # fmt: skip
    if any(params.get(k) != v for k, v in expected.items()) or params.get("dtype") is not np.float64:
        return vectorizer, model, None, np.empty(0, np.int64)
    stop = vectorizer.get_stop_words() or frozenset()
    listed = sorted((col, term) for term, col in vectorizer.vocabulary_.items() if term not in stop)
    terms = pa.array([term for _, term in listed], pa.large_string())
    return vectorizer, model, terms, np.array([col for col, _ in listed], np.int64)


def _ascii_counts(words: pa.Array, doc: np.ndarray, n_docs: int, terms: pa.Array, columns: np.ndarray,
                  n_features: int) -> Any:
    """The term-count matrix `CountVectorizer.transform` makes of ASCII texts, built with Arrow and numpy.

    On ASCII text the token pattern `\\b\\w\\w+\\b` finds the lower-cased runs of two or more `[A-Za-z0-9_]`
    (`ascii_words`; shorter ones are never in `terms`), and stop words are not in `terms`. Entries are sorted
    by column within each row, with the dtypes scikit-learn uses, so the tf-idf weights and scores that follow
    are bit-for-bit its own.
    """
    import scipy.sparse as sp

    idx = pc.index_in(words, value_set=terms)
    known = idx.is_valid().to_numpy(zero_copy_only=False)
    key = doc[known] * n_features + columns[idx.drop_null().to_numpy()]
    cells, counts = np.unique(key, return_counts=True)
    rows = cells // n_features
    indptr = np.zeros(n_docs + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_docs), out=indptr[1:])
    x = sp.csr_array(
        (counts.astype(np.intc), (cells % n_features).astype(np.int32), indptr.astype(np.int32)),
        shape=(n_docs, n_features), dtype=np.float64,
    )
    x.sort_indices()
    return x


def toxicity_scores(
    texts: Sequence[str | None] | pa.Array, split: tuple[pa.Array, np.ndarray] | None = None
) -> np.ndarray:
    """`alt-profanity-check`'s probability that each text is offensive, in one vectorised call; 0 for empty text.

    ASCII texts (most of a web crawl's English) are counted with Arrow; scikit-learn's vectorizer, a Python
    loop over every token, counts only the others. Both give the same matrix, so the same scores. Imported on
    first use: loading scikit-learn and the model takes seconds, and runs with the classifier off never pay it.
    `split` is `_split_words(texts)` when the caller has it: its words of an ASCII text are the counted ones.
    """
    from sklearn.preprocessing import normalize

    from refinery.tasks.quality._text import ascii_words  # here: the quality package imports this module

    vectorizer, model, terms, columns = _toxicity_model()
    arr = texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.large_string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    scores = np.zeros(len(arr), np.float64)
    is_ascii = np.asarray(pc.string_is_ascii(arr).to_numpy(zero_copy_only=False), bool)
    if terms is None:
        is_ascii[:] = False
    # Python's `str.isspace` on ASCII: tab to carriage return, the four separators \x1c-\x1f and space.
    blank = pc.match_substring_regex(arr, r"^[\t-\r\x1c-\x20]*$").to_numpy(zero_copy_only=False)
    fast = np.flatnonzero(is_ascii & ~blank)
    if len(fast):
        if split is None:
            words, doc = ascii_words(arr.take(pa.array(fast)))
        else:
            row = np.full(len(arr), -1, np.int64)
            row[fast] = np.arange(len(fast))
            of_word = row[np.repeat(np.arange(len(arr)), np.diff(split[1]))]
            words, doc = split[0].filter(pa.array(of_word >= 0)), of_word[of_word >= 0]
        x = _ascii_counts(words, doc, len(fast), terms, columns, len(vectorizer.vocabulary_))
        x.data *= vectorizer.idf_[x.indices]  # `TfidfTransformer.transform`, step by step
        x = normalize(x, norm="l2", copy=False)
        scores[fast] = model.predict_proba(x)[:, 1]
    rest = np.flatnonzero(~is_ascii)
    if len(rest):
        values = arr.take(pa.array(rest)).to_pylist()
        present = [j for j, t in enumerate(values) if t and not t.isspace()]
        if present:
            x = vectorizer.transform([values[j] for j in present])
            scores[rest[present]] = model.predict_proba(x)[:, 1]
    return scores


def safety_signals(
    texts: Sequence[str | None], metas: Sequence[str | None] | None, rules: SafetyRules,
    arr: pa.Array | None = None,
) -> dict[str, pa.Array]:
    """Signal columns for a batch: block-list word matches, blocked meta URL, blocked URLs in the text, toxicity.

    `arr` is `texts` as an Arrow array when the caller has one (the classifier reads it without a copy).
    Only the documents whose meta names a URL, or whose text may hold one, are looked at in Python.
    """
    lists = rules.lists()
    n = len(texts)
    host_col: list[str] = [""] * n
    blocked = np.zeros(n, bool)
    text_urls = np.zeros(n, np.int64)
    split = _split_words(texts)
    hits, words, first = lists.word_hits(texts, split)
    if metas is not None:
        for i in [i for i, m in enumerate(metas) if m and '"url"' in m]:
            url = _meta_url(metas[i])
            if url:
                host_col[i] = host_of(url)
                blocked[i] = lists.blocked_host(host_col[i])
    if rules.check_text_urls:
        for i, text in enumerate(texts):
            if text and ("http" in text or "www." in text):
                text_urls[i] = sum(lists.blocked_host(host_of(u)) for u in _URL.findall(text))
    frac = np.divide(hits, words, out=np.zeros(n, np.float64), where=words > 0)
    toxicity = toxicity_scores(texts if arr is None else arr, split) if rules.toxicity else np.full(n, np.nan)
    return {
        "safety_word_hits": pa.array(hits, pa.int64()),
        "safety_word_frac": pa.array(frac, pa.float64()),
        "safety_first_word": pa.array(first, pa.string()),
        "safety_url_host": pa.array(host_col, pa.string()),
        "safety_blocked_domain": pa.array(blocked, pa.bool_()),
        "safety_blocked_text_urls": pa.array(text_urls, pa.int64()),
        # NaN when the classifier is off: no threshold drops it, and every batch has the same columns
        "toxicity": pa.array(toxicity, pa.float64()),
    }
