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
- Toxicity: `alt-profanity-check`'s linear model (tf-idf word counts and a
  calibrated linear SVM, shipped inside the package, no download) scores each
  document; the score is the `toxicity` column and `max_toxicity` decides
  (`safety_toxicity`), so changing it re-runs only the selection. The model's
  arrays are read from the package's files and applied with numpy and one
  compiled loop, operation for operation as scikit-learn applies them (the
  same scores, bit for bit), so no worker pays for importing scikit-learn.

The rule family (settings, rules, which documents it judges) is `refinery.tasks.quality.safety`;
this module holds the lists, the matching and the classifier call.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.tasks.decontaminate import split_words

if TYPE_CHECKING:
    from refinery.tasks.quality._text import Words
    from refinery.tasks.quality.safety import SafetyRules

DATA_DIR = Path(__file__).with_name("data")
WORD_LISTS = DATA_DIR / "badwords"
DEFAULT_WORDS = WORD_LISTS / "en.txt"
DEFAULT_DOMAINS = DATA_DIR / "ut1_domains.txt.gz"
_WORD = re.compile(r"\w+")
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # the toxicity vectorizer's token pattern
_SPACE = pa.scalar(" ", pa.large_string())
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


@dataclass
class SafetyWords:
    """A batch's words as `decontaminate.split_words` splits them (lower-cased runs of letters, digits, marks
    and underscores): `dictionary[indices]` in order, the words of document i at `starts[i]:starts[i + 1]`.

    Block-list and vocabulary look-ups are made once per distinct word, in `dictionary`, and spread with
    `indices`.
    """

    dictionary: pa.Array
    indices: np.ndarray
    starts: np.ndarray
    doc: np.ndarray  # the document of each word

    def strings(self) -> pa.Array:
        return self.dictionary.take(pa.array(self.indices, pa.int64()))

    def lookup(self, value_set: pa.Array) -> np.ndarray:
        """Each word's position in `value_set` (-1: not in it)."""
        found = pc.index_in(self.dictionary, value_set=value_set).fill_null(-1)
        return np.asarray(found.to_numpy(zero_copy_only=False), np.int64)[self.indices]


def _split_words(texts: Sequence[str | None] | pa.Array, whitespace: Words | None = None) -> SafetyWords:
    """`decontaminate.split_words`: ASCII texts split with numpy over their bytes, the others with Arrow.

    `whitespace` is the batch's whitespace split when the caller has it: an ASCII text's words are then the
    runs of its whitespace words (no run crosses whitespace), found once per distinct whitespace word.
    """
    from refinery.tasks.quality._text import ascii_words  # here: the quality package imports this module

    arr = texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.large_string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    is_ascii = np.asarray(pc.string_is_ascii(arr).to_numpy(zero_copy_only=False), bool)
    fast, slow = np.flatnonzero(is_ascii), np.flatnonzero(~is_ascii)
    if whitespace is None:
        words, doc = ascii_words(arr.take(pa.array(fast)))
        doc = fast[doc]
        encoded = pc.dictionary_encode(words) if len(words) else None
        dictionary = encoded.dictionary if encoded is not None else pa.array([], pa.large_string())
        indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) if encoded else np.zeros(0, np.int64)
    else:
        vocab = whitespace.vocab
        plain = np.flatnonzero(np.asarray(pc.string_is_ascii(vocab).to_numpy(zero_copy_only=False), bool))
        runs, owner = ascii_words(vocab.take(pa.array(plain, pa.int64())))
        encoded = pc.dictionary_encode(runs) if len(runs) else None
        dictionary = encoded.dictionary if encoded is not None else pa.array([], pa.large_string())
        run_ids = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) if encoded else np.zeros(0, np.int64)
        per_word = np.bincount(plain[owner], minlength=len(vocab)).astype(np.int64)
        first_run = np.cumsum(per_word) - per_word
        indices, doc = _expand_runs(whitespace.offsets, whitespace.ids, is_ascii, per_word, first_run, run_ids)
    if len(slow):
        other, starts = split_words(arr.take(pa.array(slow)).to_pylist())
        other_doc = np.repeat(slow, np.diff(starts))
        order = np.argsort(np.concatenate([doc, other_doc]), kind="stable")
        indices = np.concatenate([indices, len(dictionary) + np.arange(len(other))])[order]
        dictionary = pa.concat_arrays([dictionary.cast(pa.large_string()), other.cast(pa.large_string())])
        doc = np.concatenate([doc, other_doc])[order]
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(doc, minlength=n), out=starts[1:])
    return SafetyWords(dictionary.cast(pa.large_string()), indices, starts, doc)


@numba.njit(cache=True, nogil=True)
def _expand_runs(offsets, ids, is_ascii, per_word, first_run, run_ids):  # noqa: ANN001, ANN202
    """The runs of the whitespace words of the ASCII texts, in order (`run_ids[first_run[v]:][:per_word[v]]`
    for a word of `vocab` index v), and the text of each."""
    total = 0  # pragma: no cover (compiled)
    for d in range(len(offsets) - 1):
        if is_ascii[d]:
            for w in range(offsets[d], offsets[d + 1]):
                total += per_word[ids[w]]
    indices = np.empty(total, np.int64)
    doc = np.empty(total, np.int64)
    n = 0
    for d in range(len(offsets) - 1):
        if is_ascii[d]:
            for w in range(offsets[d], offsets[d + 1]):
                v = ids[w]
                for r in range(first_run[v], first_run[v] + per_word[v]):
                    indices[n] = run_ids[r]
                    doc[n] = d
                    n += 1
    return indices, doc


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
        self, texts: Sequence[str | None], split: SafetyWords | None = None, arr: pa.Array | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per document: block-list matches, words, and the term shown in a drop's detail.

        Single words are one look-up per distinct word of the batch; phrases are searched for only in the
        documents holding their words in sequence (one look-up of the batch's k-word sequences that start
        with a phrase's first word), so the regular expression sees few documents. The term shown is the
        first phrase found, else the earliest listed word. `split` is `_split_words(texts)` and `arr` the
        texts as Arrow when the caller has them.
        """
        if split is None:
            split = _split_words(texts if arr is None else arr)
        starts = split.starts
        n = len(texts)
        counts = np.diff(starts)
        doc = split.doc
        hits = np.zeros(n, np.int64)
        first = [""] * n
        n_words = len(split.indices)
        if self.words and n_words:
            listed = split.lookup(pa.array(sorted(self.words), pa.large_string())) >= 0
            hit_at = np.flatnonzero(listed)
            hits += np.bincount(doc[hit_at], minlength=n)
            docs, j = np.unique(doc[hit_at], return_index=True)  # each document's earliest match
            shown = split.dictionary.take(pa.array(split.indices[hit_at[j]], pa.int64())).to_pylist()
            for d, w in zip(docs.tolist(), shown, strict=True):
                first[d] = w
        if self.phrases is None or not n:
            return hits, counts, first
        candidates = np.zeros(n, bool)
        for k, terms in self.ngrams.items():
            m = n_words - k + 1
            if m <= 0:
                continue
            heads = pa.array(sorted({t.split(" ", 1)[0] for t in terms}), pa.large_string())
            starts_ok = split.lookup(heads)[:m] >= 0
            at = np.flatnonzero(starts_ok & (doc[:m] == doc[k - 1 :]))  # k words inside one document
            if not len(at):
                continue
            grams = split.dictionary.take(pa.array(split.indices[at], pa.int64()))
            for j in range(1, k):
                following = split.dictionary.take(pa.array(split.indices[at + j], pa.int64()))
                grams = pc.binary_join_element_wise(grams, following, _SPACE)
            listed = pc.is_in(grams, value_set=pa.array(sorted(terms), pa.large_string()))
            candidates[doc[at[listed.to_numpy(zero_copy_only=False)]]] = True
        if self.phrase_filter:
            if arr is None:
                arr = pa.array(texts, pa.large_string())
            arr = pc.fill_null(arr.cast(pa.large_string()), "")
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
def _toxicity_model() -> tuple[Any, Any]:
    """`alt-profanity-check`'s vectorizer and model, loaded with scikit-learn (seconds): the reference, and the
    path taken only when `_toxicity_params` cannot read the shipped model."""
    from profanity_check.profanity_check import model, vectorizer

    return vectorizer, model


class _Stub:
    """Stands for a scikit-learn class while the shipped model is read: keeps the pickled attributes."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {})


@dataclass(frozen=True)
class _Toxicity:
    """The shipped classifier as arrays: tf-idf weights, then one linear SVM and sigmoid per calibration fold."""

    terms: pa.Array  # the vocabulary, and the column of each term
    columns: np.ndarray
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # (folds, features)
    intercept: np.ndarray  # (folds,)
    a: np.ndarray  # the sigmoids' slopes and offsets, (folds,)
    b: np.ndarray


def _read_shipped(path: Path, classes: dict[tuple[str, str], type]) -> Any:
    """A joblib file of the installed `profanity_check`, its scikit-learn objects read as plain attributes."""
    from joblib.numpy_pickle import NumpyUnpickler

    class Unpickler(NumpyUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module.split(".")[0] == "sklearn":
                return classes.setdefault((module, name), type(name, (_Stub,), {}))
            return super().find_class(module, name)

    with path.open("rb") as f:
        return Unpickler(str(path), f, None).load()


@functools.cache
def _toxicity_params() -> _Toxicity | None:
    """The shipped model's arrays, read without importing scikit-learn (which takes seconds in every worker);
    None when the model is not the kind `_tfidf_svm_scores` reproduces (then scikit-learn scores it).

    The vectorizer's stop words are not needed: they were removed when its vocabulary was fitted, so no
    vocabulary term is one (tests/test_quality_safety.py checks it, and the scores, against scikit-learn).
    """
    import importlib.util

    spec = importlib.util.find_spec("profanity_check")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    classes: dict[tuple[str, str], type] = {}
    try:
        vectorizer = _read_shipped(data / "vectorizer.joblib", classes)
        model = _read_shipped(data / "model.joblib", classes)
        v, tfidf = vars(vectorizer), vars(vectorizer._tfidf)
        expected = {"input": "content", "analyzer": "word", "lowercase": True, "ngram_range": (1, 1),
                    "preprocessor": None, "tokenizer": None, "strip_accents": None, "binary": False,
                    "token_pattern": r"(?u)\b\w\w+\b"}  # fmt: skip
        folds = model.calibrated_classifiers_
        ok = (
            all(v.get(k) == x for k, x in expected.items())
            and v.get("dtype") is np.float64
            and (tfidf.get("norm"), tfidf.get("use_idf"), tfidf.get("sublinear_tf")) == ("l2", True, False)
            and model.method == "sigmoid"
            and list(model.classes_) == [0, 1]
            and all(
                f.method == "sigmoid" and list(f.classes) == [0, 1] and list(f.estimator.classes_) == [0, 1]
                and len(f.calibrators) == 1 and f.estimator.coef_.shape == (1, len(tfidf["idf_"]))
                for f in folds
            )
        )
        if not ok:
            return None
        listed = sorted((col, term) for term, col in vectorizer.vocabulary_.items())
        return _Toxicity(
            terms=pa.array([term for _, term in listed], pa.large_string()),
            columns=np.array([col for col, _ in listed], np.int64),
            vocabulary=dict(vectorizer.vocabulary_),
            idf=np.ascontiguousarray(tfidf["idf_"], np.float64),
            coef=np.ascontiguousarray(np.concatenate([f.estimator.coef_ for f in folds]), np.float64),
            intercept=np.array([f.estimator.intercept_[0] for f in folds], np.float64),
            a=np.array([f.calibrators[0].a_ for f in folds], np.float64),
            b=np.array([f.calibrators[0].b_ for f in folds], np.float64),
        )
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, OSError, ImportError):
        return None


@numba.njit(cache=True, nogil=True)
def _score_row(columns, counts, data, idf, coef, intercept, a, b):  # noqa: ANN001, ANN202
    """`CalibratedClassifierCV.predict_proba(TfidfTransformer.transform(counts))[:, 1]` of one row (its terms'
    columns in increasing order and their counts), operation for operation.

    Tf-idf weights (count times idf), divided by the row's L2 norm (`normalize`, a sum of squares in column
    order); per fold, the SVM's decision (the products summed in column order, plus the intercept) and the
    sigmoid `expit(-(a * d + b))`; the folds' probabilities summed in order and divided by their number.
    """
    total = 0.0  # pragma: no cover (compiled)
    for j in range(len(columns)):
        data[j] = np.float64(counts[j]) * idf[columns[j]]
        total += data[j] * data[j]
    if total != 0.0:
        norm = math.sqrt(total)
        for j in range(len(columns)):
            data[j] /= norm
    mean = 0.0
    for f in range(coef.shape[0]):
        decision = 0.0
        for j in range(len(columns)):
            decision += data[j] * coef[f, columns[j]]
        decision = decision + intercept[f]
        z = -(a[f] * decision + b[f])
        p = 1.0 / (1.0 + math.exp(-z))
        if 1.0 < p <= 1.0 + 1e-5:
            p = 1.0
        mean += p
    return mean / coef.shape[0]


@numba.njit(cache=True, nogil=True)
def _tfidf_svm_scores(starts, columns, scored, idf, coef, intercept, a, b):  # noqa: ANN001, ANN202
    """`_score_row` of each scored document: its words' columns (`columns[starts[d]:starts[d + 1]]`, -1 for a
    word that is no term) counted, in increasing column order as `CountVectorizer` sorts them."""
    scores = np.zeros(len(starts) - 1)  # pragma: no cover (compiled)
    most = 0
    for d in range(len(starts) - 1):
        most = max(most, starts[d + 1] - starts[d])
    buffer = np.empty(most, np.int64)
    terms = np.empty(most, np.int64)
    counts = np.empty(most, np.int64)
    data = np.empty(most)
    for d in range(len(starts) - 1):
        if not scored[d]:
            continue
        m = 0
        for w in range(starts[d], starts[d + 1]):
            if columns[w] >= 0:
                buffer[m] = columns[w]
                m += 1
        row = np.sort(buffer[:m])
        k = 0
        for j in range(m):
            if k > 0 and terms[k - 1] == row[j]:
                counts[k - 1] += 1
            else:
                terms[k] = row[j]
                counts[k] = 1
                k += 1
        scores[d] = _score_row(terms[:k], counts[:k], data, idf, coef, intercept, a, b)
    return scores


def toxicity_scores(texts: Sequence[str | None] | pa.Array, split: SafetyWords | None = None) -> np.ndarray:
    """`alt-profanity-check`'s probability that each text is offensive, in one vectorised call; 0 for empty text.

    The shipped model is read as arrays (`_toxicity_params`) and applied step by step as scikit-learn applies
    it, so the scores are bit-for-bit its own without importing it. ASCII texts (most of a web crawl's
    English) are split into words with numpy; the others with the vectorizer's own regular expression.
    `split` is `_split_words(texts)` when the caller has it: its words of an ASCII text are the counted ones
    (on ASCII, the vectorizer's tokens, `\\b\\w\\w+\\b`, are those of two characters or more).
    """
    from refinery.tasks.quality._text import ascii_words  # here: the quality package imports this module

    arr = texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.large_string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    scores = np.zeros(len(arr), np.float64)
    params = _toxicity_params()
    if params is None:
        values = arr.to_pylist()
        present = [j for j, t in enumerate(values) if t and not t.isspace()]
        if present:
            vectorizer, model = _toxicity_model()
            scores[present] = model.predict_proba(vectorizer.transform([values[j] for j in present]))[:, 1]
        return scores
    is_ascii = np.asarray(pc.string_is_ascii(arr).to_numpy(zero_copy_only=False), bool)
    if split is None:
        plain = np.flatnonzero(is_ascii)
        words, doc = ascii_words(arr.take(pa.array(plain, pa.int64())))
        encoded = pc.dictionary_encode(words)
        indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.zeros(len(arr) + 1, np.int64)
        np.cumsum(np.bincount(plain[doc], minlength=len(arr)), out=starts[1:])
        split = SafetyWords(encoded.dictionary, indices, starts, plain[doc])
    word_doc = split.doc
    # Python's `str.isspace` on ASCII: tab to carriage return, the four separators \x1c-\x1f and space. A blank
    # text has no word; only the ASCII texts without one are looked at.
    blank = np.zeros(len(arr), bool)
    wordless = np.flatnonzero(is_ascii & (np.bincount(word_doc, minlength=len(arr)) == 0))
    if len(wordless):
        found = pc.match_substring_regex(arr.take(pa.array(wordless)), r"^[\t-\r\x1c-\x20]*$")
        blank[wordless] = np.asarray(found.to_numpy(zero_copy_only=False), bool)
    fast = np.flatnonzero(is_ascii & ~blank)
    column = np.full(len(split.dictionary), -1, np.int64)
    if len(split.dictionary):
        idx = pc.index_in(split.dictionary, value_set=params.terms)
        column[np.asarray(idx.is_valid().to_numpy(zero_copy_only=False), bool)] = params.columns[
            idx.drop_null().to_numpy()
        ]
    cols = column[split.indices]
    cols[~is_ascii[word_doc]] = -1  # the other texts are counted below, with the vectorizer's own pattern
    rest = np.flatnonzero(~is_ascii).tolist()
    others = arr.take(pa.array(rest, pa.int64())).to_pylist() if rest else []
    present = [i for i, t in zip(rest, others, strict=True) if t and not t.isspace()]
    if present:  # their columns take the place of their words, in document order
        lookup = params.vocabulary.get
        counted = {i: np.fromiter(map(lookup, _TOKEN.findall(t.lower()), itertools.repeat(-1)), np.int64)
                   for i, t in zip(rest, others, strict=True) if t and not t.isspace()}  # fmt: skip
        per_doc = [counted[d] if d in counted else cols[split.starts[d] : split.starts[d + 1]] for d in range(len(arr))]
        lengths = np.array([len(c) for c in per_doc], np.int64)
        cols = np.concatenate(per_doc) if per_doc else cols
        starts = np.zeros(len(arr) + 1, np.int64)
        np.cumsum(lengths, out=starts[1:])
    else:
        starts = split.starts
    scored = np.zeros(len(arr), bool)
    scored[fast] = True
    scored[present] = True
    found_scores = _tfidf_svm_scores(starts, cols, scored, params.idf, params.coef, params.intercept, params.a, params.b)
    scores[scored] = found_scores[scored]
    return scores


def safety_signals(
    texts: Sequence[str | None], metas: Sequence[str | None] | None, rules: SafetyRules,
    arr: pa.Array | None = None, whitespace: Words | None = None,
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
    split = _split_words(texts if arr is None else arr, whitespace)
    hits, words, first = lists.word_hits(texts, split, arr)
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
