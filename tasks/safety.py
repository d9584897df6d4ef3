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
  and underscores: ASCII texts from the batch's distinct whitespace words in
  compiled loops, the others with Arrow), and each distinct word is looked up
  once in a hash table of the list. A phrase ("date rape", "s&m") is matched by
  one compiled regular expression with word boundaries, spaces matching any run
  of whitespace, searched only in the documents a compiled pass finds its words
  in sequence in (or, for phrases with punctuation, that Arrow's regex engine
  would find it in: a compiled search on ASCII texts, the engine on the
  others). The signals are the number of matches and their fraction of the
  document's words (`safety_blocklist_word`).
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
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.tasks.buffers import ASCII_LOWER, ascii_table, fnv1a_64, same_bytes, text_bytes
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
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


@dataclass
class SafetyWords:
    """A batch's words as `decontaminate.split_words` splits them (lower-cased runs of letters, digits, marks
    and underscores): `dictionary[indices]` in order, the words of document i at `starts[i]:starts[i + 1]`.

    Block-list and vocabulary look-ups are made once per entry of `dictionary` (the runs of each distinct
    whitespace word, and the words of the other texts), and spread with `indices`. `plain` marks the texts
    split over their bytes (see `_split_words`), `ascii` the ASCII ones (None: unknown).
    """

    dictionary: pa.Array
    indices: np.ndarray
    starts: np.ndarray
    doc: np.ndarray  # the document of each word
    ascii: np.ndarray | None = None
    plain: np.ndarray | None = None

    def strings(self) -> pa.Array:
        return self.dictionary.take(pa.array(self.indices, pa.int64()))

    @functools.cached_property
    def keys(self) -> HashedStrings:
        """`dictionary` hashed once for the look-ups of the lists and the classifier's vocabulary."""
        return HashedStrings.of(self.dictionary)


def _split_words(texts: Sequence[str | None] | pa.Array, whitespace: Words | None = None) -> SafetyWords:
    """`decontaminate.split_words`: plain texts split in a compiled pass over bytes, the others with Arrow.

    A text is plain when its characters are ASCII or punctuation, symbols and spaces without a case (curly
    quotes, dashes, no-break spaces: most of a web crawl's English). Its words are then the lower-cased runs of
    ASCII letters, digits and underscores, both for this split and for the classifier's token pattern, and
    they are the runs of its whitespace words (no run crosses whitespace), found once per distinct whitespace
    word of the batch. `whitespace` is the batch's whitespace split when the caller has it.
    """
    from refinery.tasks.quality._text import Words  # here: the quality package imports us

    arr = texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.large_string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    if whitespace is None:
        whitespace = Words.split(arr)
    is_ascii = whitespace.ascii
    plain, plain_vocab = is_ascii, whitespace.vocab_ascii
    non_ascii = np.flatnonzero(~plain_vocab)
    if len(non_ascii):  # the few distinct non-ASCII whitespace words, looked at in Python
        plain_vocab = plain_vocab.copy()
        plain_vocab[non_ascii] = [_plain_word(w) for w in whitespace.vocab.take(pa.array(non_ascii)).to_pylist()]
        mixed = np.bincount(whitespace.doc, weights=~plain_vocab[whitespace.ids], minlength=n)
        plain = mixed == 0
    data, offsets = text_bytes(whitespace.vocab)
    run_data, run_offsets, per_word, first_run = _vocab_runs(data, offsets, plain_vocab, _WORD_BYTE, ASCII_LOWER)
    dictionary = pa.LargeStringArray.from_buffers(
        len(run_offsets) - 1, pa.py_buffer(run_offsets), pa.py_buffer(run_data)
    )
    indices, doc, starts = _expand_runs(whitespace.offsets, whitespace.ids, plain, per_word, first_run)
    slow = np.flatnonzero(~plain)
    if len(slow):
        other, starts = split_words(arr.take(pa.array(slow)).to_pylist())
        other_doc = np.repeat(slow, np.diff(starts))
        order = np.argsort(np.concatenate([doc, other_doc]), kind="stable")
        indices = np.concatenate([indices, len(dictionary) + np.arange(len(other))])[order]
        dictionary = pa.concat_arrays([dictionary, other.cast(pa.large_string())])
        doc = np.concatenate([doc, other_doc])[order]
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(doc, minlength=n), out=starts[1:])
    return SafetyWords(dictionary, indices, starts, doc, is_ascii, plain)


@functools.lru_cache(maxsize=4096)
def _plain_char(c: str) -> bool:
    """A character that is a separator to Arrow's word split (`[^\\p{L}\\p{N}\\p{M}_]`) and to Python's `\\w`,
    and that lower-casing leaves alone: punctuation, a symbol or a space, with no case mapping."""
    return (
        c.isascii() and not (c.isalnum() or c == "_")
        or unicodedata.category(c)[0] in "PSZ" and not c.isalnum() and c.lower() == c and c.upper() == c
    )


def _plain_word(word: str) -> bool:
    """Whether the word's characters are ASCII letters, digits and underscores, or `_plain_char`s."""
    return all(c.isascii() and (c.isalnum() or c == "_") or _plain_char(c) for c in word)


# The bytes of `\w` on ASCII text (letters, digits, underscore), as a lookup table.
_WORD_BYTE = ascii_table(string.ascii_letters + string.digits + "_")


@numba.njit(cache=True, nogil=True)
def _vocab_runs(data, offsets, plain, word_byte, lower):  # noqa: ANN001, ANN202
    """The lower-cased runs of ASCII word bytes of each `plain` word of a vocabulary (a non-ASCII character's
    bytes separate runs), as the bytes and offsets of a string array, with each word's number of runs and the
    index of its first."""
    n = len(offsets) - 1  # pragma: no cover (compiled)
    per_word = np.zeros(n, np.int64)
    first_run = np.zeros(n, np.int64)
    n_runs = 0
    n_bytes = 0
    for v in range(n):
        first_run[v] = n_runs
        if not plain[v]:
            continue
        inside = False
        for k in range(offsets[v], offsets[v + 1]):
            if word_byte[data[k]]:
                n_bytes += 1
                if not inside:
                    n_runs += 1
                    per_word[v] += 1
                inside = True
            else:
                inside = False
    run_data = np.empty(n_bytes, np.uint8)
    run_offsets = np.zeros(n_runs + 1, np.int64)
    r = 0
    b = 0
    for v in range(n):
        if not plain[v]:
            continue
        inside = False
        for k in range(offsets[v], offsets[v + 1]):
            if word_byte[data[k]]:
                if not inside:
                    r += 1
                run_data[b] = lower[data[k]]
                b += 1
                run_offsets[r] = b
                inside = True
            else:
                inside = False
    return run_data, run_offsets, per_word, first_run


@numba.njit(cache=True, nogil=True)
def _expand_runs(offsets, ids, is_ascii, per_word, first_run):  # noqa: ANN001, ANN202
    """The runs of the whitespace words of the ASCII texts, in order (`first_run[v]`, `per_word[v]` of them for a
    word of `vocab` index v), the text of each, and where each text's runs start."""
    starts = np.zeros(len(offsets), np.int64)  # pragma: no cover (compiled)
    for d in range(len(offsets) - 1):
        runs = 0
        if is_ascii[d]:
            for w in range(offsets[d], offsets[d + 1]):
                runs += per_word[ids[w]]
        starts[d + 1] = starts[d] + runs
    total = starts[len(offsets) - 1]
    indices = np.empty(total, np.int64)
    doc = np.empty(total, np.int64)
    n = 0
    for d in range(len(offsets) - 1):
        if is_ascii[d]:
            for w in range(offsets[d], offsets[d + 1]):
                v = ids[w]
                for r in range(first_run[v], first_run[v] + per_word[v]):
                    indices[n] = r
                    doc[n] = d
                    n += 1
    return indices, doc, starts


@numba.njit(cache=True, nogil=True)
def _slot(h, mask):  # noqa: ANN001, ANN202
    """A hash's first slot in a table of `mask + 1` slots: FNV-1a's low bits mix only low bits, so the high
    half is folded in."""
    return np.int64((h ^ (h >> np.uint64(32))) & mask)  # pragma: no cover (compiled)


@numba.njit(cache=True, nogil=True)
def _hash_slots(data, offsets):  # noqa: ANN001, ANN202
    """An open-addressing table of the strings data[offsets[i]:offsets[i + 1]]: a slot holds a string's index
    (the first of equal ones) or -1."""
    n = len(offsets) - 1  # pragma: no cover (compiled)
    size = 8
    while size < 2 * n:
        size *= 2
    slots = np.full(size, -1, np.int64)
    mask = np.uint64(size - 1)
    for i in range(n):
        h = _slot(fnv1a_64(data, offsets[i], offsets[i + 1]), mask)
        while slots[h] >= 0:
            s = slots[h]
            if offsets[s + 1] - offsets[s] == offsets[i + 1] - offsets[i] and same_bytes(
                data, offsets[s], offsets[s + 1], data, offsets[i]
            ):
                break
            h = (h + 1) & (size - 1)
        if slots[h] < 0:
            slots[h] = i
    return slots


@numba.njit(cache=True, nogil=True)
def _hash_strings(data, offsets):  # noqa: ANN001, ANN202
    """`fnv1a_64` of each string data[offsets[i]:offsets[i + 1]]."""
    out = np.empty(len(offsets) - 1, np.uint64)  # pragma: no cover (compiled)
    for i in range(len(offsets) - 1):
        out[i] = fnv1a_64(data, offsets[i], offsets[i + 1])
    return out


@numba.njit(cache=True, nogil=True)
def _find_strings(slots, data, offsets, qdata, qoffsets, qhashes):  # noqa: ANN001, ANN202
    """The index in the table's strings of each query string qdata[qoffsets[q]:qoffsets[q + 1]] (its hash
    `qhashes[q]`), or -1."""
    out = np.full(len(qoffsets) - 1, -1, np.int64)  # pragma: no cover (compiled)
    size = len(slots)
    mask = np.uint64(size - 1)
    for q in range(len(qoffsets) - 1):
        a, b = qoffsets[q], qoffsets[q + 1]
        h = _slot(qhashes[q], mask)
        while slots[h] >= 0:
            s = slots[h]
            if offsets[s + 1] - offsets[s] == b - a and same_bytes(data, offsets[s], offsets[s + 1], qdata, a):
                out[q] = s
                break
            h = (h + 1) & (size - 1)
    return out


class StringSet:
    """Strings to look words up in, hashed once: a batch's words are found in one compiled loop rather than by
    an Arrow `index_in` that hashes the whole set again on every call (the classifier's vocabulary is 15k terms)."""

    def __init__(self, values: Sequence[str] | pa.Array) -> None:
        arr = values if isinstance(values, pa.Array) else pa.array(list(values), pa.large_string())
        data, offsets = text_bytes(arr)
        self.data, self.offsets = np.array(data), np.array(offsets)  # owned copies, not views of Arrow buffers
        self.slots = _hash_slots(self.data, self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def find(self, words: pa.Array | HashedStrings) -> np.ndarray:
        """Each string's index among the set's values (the first of equal ones), -1 when absent; nulls count
        as empty strings. Strings looked up in several sets are hashed once (`HashedStrings`)."""
        keys = words if isinstance(words, HashedStrings) else HashedStrings.of(words)
        return _find_strings(self.slots, self.data, self.offsets, keys.data, keys.offsets, keys.hashes)


@dataclass(frozen=True)
class HashedStrings:
    """Strings as bytes, offsets and hashes, to look up in `StringSet`s."""

    data: np.ndarray
    offsets: np.ndarray
    hashes: np.ndarray

    @staticmethod
    def of(strings: pa.Array) -> HashedStrings:
        data, offsets = text_bytes(strings)
        return HashedStrings(data, offsets, _hash_strings(data, offsets))


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
    odd: tuple[str, ...] = ()  # the phrases `phrase_filter` finds

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
        return BlockLists(single, ngrams, phrases, odd_filter, frozenset(domains), digest, tuple(odd))

    @functools.cached_property
    def _matcher(self) -> _Matcher:
        return _Matcher.of(self)

    def word_hits(
        self, texts: Sequence[str | None] | pa.Array, split: SafetyWords | None = None, arr: pa.Array | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per document: block-list matches, words, and the term shown in a drop's detail.

        Single words are one look-up per dictionary entry of the split, counted per document in one compiled
        pass, which also finds the documents holding a phrase's words in sequence, so the phrases' regular
        expression sees few documents (those, and the ones Arrow's regex engine finds a phrase with
        punctuation in). The term shown is the first phrase found, else the earliest listed word. `split` is
        `_split_words(texts)` and `arr` the texts as Arrow when the caller has them.
        """
        if split is None:
            split = _split_words(texts if arr is None else arr)
        n = len(texts)
        counts = np.diff(split.starts)
        matcher = self._matcher
        listed = matcher.words.find(split.keys) >= 0
        phrase_word = matcher.phrase_words.find(split.keys)
        hits, earliest, candidates = _match_words(
            split.indices, split.starts, listed, phrase_word, matcher.head_start, matcher.phrases, matcher.lengths
        )
        first = [""] * n
        docs = np.flatnonzero(earliest >= 0)
        if len(docs):
            shown = split.dictionary.take(pa.array(split.indices[earliest[docs]], pa.int64())).to_pylist()
            for d, w in zip(docs.tolist(), shown, strict=True):
                first[d] = w
        if self.phrases is None or not n:
            return hits, counts, first
        if self.phrase_filter:
            if arr is None:
                arr = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.large_string())
            arr = pc.fill_null(arr.cast(pa.large_string()), "")
            candidates |= matcher.odd_phrases(arr, split.ascii)
        for i in np.flatnonzero(candidates).tolist():
            found = self.phrases.findall(_text_at(texts, i))
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


def _text_at(texts: Sequence[str | None] | pa.Array, i: int) -> str:
    """Text i of a list or an Arrow array, "" for a null."""
    value = texts[i].as_py() if isinstance(texts, pa.Array) else texts[i]
    return value or ""


@dataclass(frozen=True)
class _Matcher:
    """The block lists as the compiled word pass reads them: the single words, and the plain phrases as rows of
    ids of their words (`phrase_words`), sorted by first word, those starting with word h at
    `head_start[h]:head_start[h + 1]`."""

    words: StringSet
    phrase_words: StringSet
    phrases: np.ndarray  # (phrases, longest), -1 after a phrase's last word
    lengths: np.ndarray
    head_start: np.ndarray
    odd_filter: str  # `BlockLists.phrase_filter`, for the texts the compiled search does not decide
    odd_other: str  # the part of it an ASCII text may match besides the ASCII phrases (usually none)
    odd_chunks: np.ndarray  # the ASCII odd phrases' whitespace-separated pieces, lower-cased, as bytes
    odd_chunk_offsets: np.ndarray  # piece c at odd_chunks[odd_chunk_offsets[c]:odd_chunk_offsets[c + 1]]
    odd_starts: np.ndarray  # the pieces of phrase t at odd_starts[t]:odd_starts[t + 1]

    def odd_phrases(self, arr: pa.Array, is_ascii: np.ndarray | None) -> np.ndarray:
        """Which texts `phrase_filter` matches (case-insensitively, in Arrow's regex engine): on ASCII texts,
        a compiled search for the ASCII phrases (RE2's `\\s` is `[\\t\\n\\f\\r ]`, its case folding on ASCII
        text ASCII's), plus the engine for any phrase whose characters fold to ASCII ones; the engine on the
        others."""
        if is_ascii is None:
            is_ascii = np.asarray(pc.string_is_ascii(arr).to_numpy(zero_copy_only=False), bool)
        data, offsets = text_bytes(arr)
        found = _find_odd(data, offsets, is_ascii, self.odd_chunks, self.odd_chunk_offsets, self.odd_starts, ASCII_LOWER)
        rest = np.flatnonzero(~is_ascii)
        if len(rest):
            matched = pc.match_substring_regex(arr.take(pa.array(rest)), self.odd_filter, ignore_case=True)
            found[rest] = np.asarray(matched.to_numpy(zero_copy_only=False), bool)
        if self.odd_other:
            found |= np.asarray(
                pc.match_substring_regex(arr, self.odd_other, ignore_case=True).to_numpy(zero_copy_only=False), bool
            )
        return found

    @staticmethod
    def of(lists: BlockLists) -> _Matcher:
        terms = sorted(t for k in lists.ngrams for t in lists.ngrams[k])
        vocab = sorted({w for t in terms for w in t.split(" ")})
        position = {w: i for i, w in enumerate(vocab)}
        rows = sorted([position[w] for w in t.split(" ")] for t in terms)
        longest = max((len(r) for r in rows), default=1)
        phrases = np.full((len(rows), longest), -1, np.int64)
        for i, r in enumerate(rows):
            phrases[i, : len(r)] = r
        heads = np.array([r[0] for r in rows], np.int64)
        head_start = np.searchsorted(heads, np.arange(len(vocab) + 1)).astype(np.int64)
        lengths = np.array([len(r) for r in rows], np.int64)
        plain = [t for t in lists.odd if t.isascii()]
        other = [t for t in lists.odd if not t.isascii() and _folds_to_ascii(t)]
        chunks = [c.encode() for t in plain for c in t.split()]
        return _Matcher(
            StringSet(sorted(lists.words)), StringSet(vocab), phrases, lengths, head_start,
            odd_filter=lists.phrase_filter,
            odd_other="|".join(r"\s+".join(re.escape(c) for c in t.split()) for t in other),
            odd_chunks=np.frombuffer(b"".join(chunks), np.uint8).copy(),
            odd_chunk_offsets=np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64),
            odd_starts=np.concatenate([[0], np.cumsum([len(t.split()) for t in plain])]).astype(np.int64),
        )


def _folds_to_ascii(term: str) -> bool:
    """Whether a non-ASCII character of `term` has an ASCII case form (U+017F long s is one of `s`, U+212A Kelvin
    sign one of `k`): a case-insensitive match of it may then lie in ASCII text."""
    forms = (f for c in term if not c.isascii() for f in (c.lower(), c.upper(), c.casefold()))
    return any(ch.isascii() for f in forms for ch in f)


# RE2's `\s` (no vertical tab), as a lookup table.
_RE2_SPACE = np.zeros(256, np.bool_)
_RE2_SPACE[list(b"\t\n\f\r ")] = True


@numba.njit(cache=True, nogil=True)
def _find_odd(data, offsets, is_ascii, chunks, chunk_offsets, starts, lower):  # noqa: ANN001, ANN202
    """Per ASCII text: whether one of the phrases (pieces of lower-case bytes, `\\s+` between them) occurs in
    it, letters matched in either case: the phrases' regular expression, case-insensitive, on ASCII text.

    Each phrase is looked for only where its anchor occurs: the first byte of its first piece that is no letter
    or digit ("-" of "g-spot"), else that piece's first byte; such bytes are rare in prose.
    """
    n = len(offsets) - 1  # pragma: no cover (compiled)
    found = np.zeros(n, np.bool_)
    n_terms = len(starts) - 1
    if n_terms == 0:
        return found
    anchor = np.zeros(n_terms, np.int64)  # the anchor's offset in the phrase's first piece
    by_byte = np.zeros((256, n_terms), np.bool_)  # the phrases a text byte may be the anchor of
    for t in range(n_terms):
        a, b = chunk_offsets[starts[t]], chunk_offsets[starts[t] + 1]
        for j in range(a, b):
            c = chunks[j]
            if not ((97 <= c <= 122) or (48 <= c <= 57)):
                anchor[t] = j - a
                break
        c = chunks[a + anchor[t]]
        for x in range(256):
            if lower[x] == c:
                by_byte[x, t] = True
    marked = np.zeros(256, np.bool_)
    for x in range(256):
        for t in range(n_terms):
            marked[x] |= by_byte[x, t]
    for d in range(n):
        if not is_ascii[d]:
            continue
        first, end = offsets[d], offsets[d + 1]
        for k in range(first, end):
            if not marked[data[k]]:
                continue
            for t in range(n_terms):
                if by_byte[data[k], t] and k - anchor[t] >= first and _phrase_at(
                    data, k - anchor[t], end, chunks, chunk_offsets, starts[t], starts[t + 1], lower
                ):
                    found[d] = True
                    break
            if found[d]:
                break
    return found


@numba.njit(cache=True, nogil=True)
def _phrase_at(data, q, end, chunks, chunk_offsets, first, last, lower):  # noqa: ANN001, ANN202
    """Whether the pieces first..last - 1 occur at data[q:], with RE2 whitespace (one byte or more) between."""
    for piece in range(first, last):  # pragma: no cover (compiled)
        if piece > first:
            if q >= end or not _is_re2_space(data[q]):
                return False
            while q < end and _is_re2_space(data[q]):
                q += 1
        a, b = chunk_offsets[piece], chunk_offsets[piece + 1]
        if q + (b - a) > end:
            return False
        for j in range(b - a):
            if lower[data[q + j]] != chunks[a + j]:
                return False
        q += b - a
    return True


@numba.njit(cache=True, nogil=True)
def _is_re2_space(c):  # noqa: ANN001, ANN202
    return c == 9 or c == 10 or c == 12 or c == 13 or c == 32  # pragma: no cover (compiled)


@numba.njit(cache=True, nogil=True)
def _match_words(indices, starts, listed, phrase_word, head_start, phrases, lengths):  # noqa: ANN001, ANN202
    """Per document: its listed words (`listed[indices[i]]`), the position of the earliest (-1: none), and
    whether some phrase's words follow one another in it (`phrase_word`: a dictionary entry's id among the
    phrases' words, -1 for none)."""
    n = len(starts) - 1  # pragma: no cover (compiled)
    hits = np.zeros(n, np.int64)
    earliest = np.full(n, -1, np.int64)
    candidate = np.zeros(n, np.bool_)
    for d in range(n):
        end = starts[d + 1]
        for i in range(starts[d], end):
            w = indices[i]
            if listed[w]:
                hits[d] += 1
                if earliest[d] < 0:
                    earliest[d] = i
            h = phrase_word[w]
            if h < 0 or candidate[d]:
                continue
            for p in range(head_start[h], head_start[h + 1]):
                k = lengths[p]
                if i + k > end:
                    continue
                same = True
                for j in range(1, k):
                    if phrase_word[indices[i + j]] != phrases[p, j]:
                        same = False
                        break
                if same:
                    candidate[d] = True
                    break
    return hits, earliest, candidate


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

    terms: StringSet  # the vocabulary, and the column of each term
    columns: np.ndarray
    vocabulary: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray  # (folds, features)
    by_term: np.ndarray  # per term (row), its idf and then each fold's weight, rows padded to 64 bytes
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
        coef = np.ascontiguousarray(np.concatenate([f.estimator.coef_ for f in folds]), np.float64)
        return _Toxicity(
            terms=StringSet([term for _, term in listed]),
            columns=np.array([col for col, _ in listed], np.int64),
            vocabulary=dict(vectorizer.vocabulary_),
            idf=np.ascontiguousarray(tfidf["idf_"], np.float64),
            coef=coef,
            by_term=_by_term(tfidf["idf_"], coef),
            intercept=np.array([f.estimator.intercept_[0] for f in folds], np.float64),
            a=np.array([f.calibrators[0].a_ for f in folds], np.float64),
            b=np.array([f.calibrators[0].b_ for f in folds], np.float64),
        )
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, OSError, ImportError):
        return None


def _by_term(idf: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """A row per term: its idf, then its weight in each fold, padded to a multiple of 8 values (64 bytes), so
    scoring a term reads one cache line rather than one per fold and one for the idf."""
    width = -(-(1 + coef.shape[0]) // 8) * 8
    table = np.zeros((coef.shape[1], width), np.float64)
    table[:, 0] = idf
    table[:, 1 : 1 + coef.shape[0]] = coef.T
    return table


@numba.njit(cache=True, nogil=True)
def _score_row(columns, counts, data, by_term, intercept, a, b, decision):  # noqa: ANN001, ANN202
    """`CalibratedClassifierCV.predict_proba(TfidfTransformer.transform(counts))[:, 1]` of one row (its terms'
    columns in increasing order and their counts), operation for operation.

    Tf-idf weights (count times idf), divided by the row's L2 norm (`normalize`, a sum of squares in column
    order); per fold, the SVM's decision (the products summed in column order, plus the intercept) and the
    sigmoid `expit(-(a * d + b))`; the folds' probabilities summed in order and divided by their number.
    `by_term` holds a term's idf and folds' weights in one row (`_Toxicity.by_term`), read together; each
    fold's sum (`decision[f]`) still adds its products in column order.
    """
    total = 0.0  # pragma: no cover (compiled)
    for j in range(len(columns)):
        data[j] = np.float64(counts[j]) * by_term[columns[j], 0]
        total += data[j] * data[j]
    if total != 0.0:
        norm = math.sqrt(total)
        for j in range(len(columns)):
            data[j] /= norm
    folds = len(intercept)
    for f in range(folds):
        decision[f] = 0.0
    for j in range(len(columns)):
        for f in range(folds):
            decision[f] += data[j] * by_term[columns[j], 1 + f]
    mean = 0.0
    for f in range(folds):
        d = decision[f] + intercept[f]
        z = -(a[f] * d + b[f])
        p = 1.0 / (1.0 + math.exp(-z))
        if 1.0 < p <= 1.0 + 1e-5:
            p = 1.0
        mean += p
    return mean / folds


# The de Bruijn sequence and table that give the index of a 64-bit word's lowest set bit in two operations.
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_LOWEST_BIT = np.zeros(64, np.int64)
for _i in range(64):
    _LOWEST_BIT[((1 << _i) * 0x03F79D71B4CB0A89 & (2**64 - 1)) >> 58] = _i


@numba.njit(cache=True, nogil=True)
def _tfidf_svm_scores(starts, columns, scored, by_term, intercept, a, b):  # noqa: ANN001, ANN202
    """`_score_row` of each scored document: its words' columns (`columns[starts[d]:starts[d + 1]]`, -1 for a
    word that is no term) counted, in increasing column order as `CountVectorizer` sorts them.

    A document's distinct columns are marked in a two-level bitmap (a bit per column, and a bit per 64-column
    word of it) and read back in increasing order: no sort, and a cost in the document's words, not in the
    vocabulary's size.
    """
    scores = np.zeros(len(starts) - 1)  # pragma: no cover (compiled)
    n_terms = by_term.shape[0]
    tally = np.zeros(n_terms, np.int64)
    low = np.zeros((n_terms + 63) // 64, np.uint64)
    high = np.zeros((len(low) + 63) // 64, np.uint64)
    most = 0
    for d in range(len(starts) - 1):
        most = max(most, starts[d + 1] - starts[d])
    terms = np.empty(most, np.int64)
    counts = np.empty(most, np.int64)
    data = np.empty(most)
    decision = np.empty(len(intercept))
    one = np.uint64(1)
    for d in range(len(starts) - 1):
        if not scored[d]:
            continue
        for w in range(starts[d], starts[d + 1]):
            c = columns[w]
            if c >= 0:
                tally[c] += 1
                low[c >> 6] |= one << np.uint64(c & 63)
                high[c >> 12] |= one << np.uint64((c >> 6) & 63)
        k = 0
        for h in range(len(high)):
            hw = high[h]
            while hw:
                bit = hw & (~hw + one)
                hw ^= bit
                i = h * 64 + _LOWEST_BIT[(bit * _DE_BRUIJN) >> np.uint64(58)]
                lw = low[i]
                while lw:
                    lb = lw & (~lw + one)
                    lw ^= lb
                    c = i * 64 + _LOWEST_BIT[(lb * _DE_BRUIJN) >> np.uint64(58)]
                    terms[k] = c
                    counts[k] = tally[c]
                    tally[c] = 0
                    k += 1
                low[i] = 0
            high[h] = 0
        scores[d] = _score_row(terms[:k], counts[:k], data, by_term, intercept, a, b, decision)
    return scores


def toxicity_scores(texts: Sequence[str | None] | pa.Array, split: SafetyWords | None = None) -> np.ndarray:
    """`alt-profanity-check`'s probability that each text is offensive, in one vectorised call; 0 for empty text.

    The shipped model is read as arrays (`_toxicity_params`) and applied step by step as scikit-learn applies
    it, so the scores are bit-for-bit its own without importing it. Plain texts (`_split_words`: most of a web
    crawl's English) are counted from the family's word split; the others with the vectorizer's own regular
    expression. `split` is `_split_words(texts)` when the caller has it: its words of a plain text are the
    counted ones (there, the vectorizer's tokens, `\\b\\w\\w+\\b`, are those of two characters or more).
    """
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
    if split is None:
        split = _split_words(arr)
    if split.plain is not None:
        plain = split.plain
    else:
        plain = np.asarray(pc.string_is_ascii(arr).to_numpy(zero_copy_only=False), bool)
    # A blank text (empty, or `str.isspace`) is not scored; it has no word, so only the plain texts without
    # one are looked at.
    blank = np.zeros(len(arr), bool)
    wordless = np.flatnonzero(plain & (np.diff(split.starts) == 0))
    if len(wordless):
        blank[wordless] = [not t or t.isspace() for t in arr.take(pa.array(wordless)).to_pylist()]
    fast = np.flatnonzero(plain & ~blank)
    found = params.terms.find(split.keys)
    column = np.where(found >= 0, params.columns[np.maximum(found, 0)], -1) if len(params.columns) else found
    cols = column[split.indices]
    rest = np.flatnonzero(~plain).tolist()
    if rest:
        cols[~plain[split.doc]] = -1  # the other texts are counted below, with the vectorizer's own pattern
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
    found_scores = _tfidf_svm_scores(starts, cols, scored, params.by_term, params.intercept, params.a, params.b)
    scores[scored] = found_scores[scored]
    return scores


def safety_signals(
    texts: Sequence[str | None] | pa.Array, metas: Sequence[str | None] | None, rules: SafetyRules,
    arr: pa.Array | None = None, whitespace: Words | None = None,
) -> dict[str, pa.Array]:
    """Signal columns for a batch: block-list word matches, blocked meta URL, blocked URLs in the text, toxicity.

    `texts` is a list or an Arrow array; `arr` is `texts` as an Arrow array when the caller has both (the split
    and the classifier read it without a copy), `whitespace` the batch's whitespace split. Only the documents
    whose meta names a URL, or whose text may hold one, are looked at in Python.
    """
    lists = rules.lists()
    n = len(texts)
    if arr is None:
        arr = texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.large_string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    host_col: list[str] = [""] * n
    blocked = np.zeros(n, bool)
    text_urls = np.zeros(n, np.int64)
    split = _split_words(arr, whitespace)
    hits, words, first = lists.word_hits(texts, split, arr)
    if metas is not None:
        for i in [i for i, m in enumerate(metas) if m and '"url"' in m]:
            url = _meta_url(metas[i])
            if url:
                host_col[i] = host_of(url)
                blocked[i] = lists.blocked_host(host_col[i])
    if rules.check_text_urls:
        # `"http" in text or "www." in text`, matched by Arrow over the bytes; only those texts reach Python
        maybe = pc.or_(pc.match_substring(arr, "http"), pc.match_substring(arr, "www."))
        for i in np.flatnonzero(maybe.to_numpy(zero_copy_only=False)).tolist():
            found = _URL.findall(_text_at(texts, i))
            text_urls[i] = sum(lists.blocked_host(host_of(u)) for u in found)
    frac = np.divide(hits, words, out=np.zeros(n, np.float64), where=words > 0)
    toxicity = toxicity_scores(arr, split) if rules.toxicity else np.full(n, np.nan)
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
