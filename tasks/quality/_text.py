"""Text helpers shared by the rule families: the whitespace word split, ratios, duplicate counting."""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.tasks.buffers import ascii_table, same_bytes, text_bytes

# Trimmed from both ends of a word before its length is measured or it is matched as a stop word.
TRIM = string.punctuation + "“”‘’«»…—–·•"
# Sentence-final punctuation; a line ending in `."` or `?)` ends a sentence, one ending in `('x')` does not.
TERMINAL_PUNCT = (".", "!", "?", "…", "。", "！", "？", "‼", "‽", "⁇", "⁈", "⁉", "।", "؟", "۔")
CLOSERS = "\"'”’»)]"


@dataclass
class Words:
    """Whitespace words of a batch, flattened, with the document each belongs to.

    Words are whitespace-separated tokens, as in the Gopher paper (a token like "end." is one word that
    contains letters), not the output of a linguistic tokenizer that splits punctuation into words of its own.
    The batch's distinct words are `vocab` (in order of first occurrence), the words in order `vocab[ids]`,
    those of document i at `offsets[i]:offsets[i + 1]`.
    """

    vocab: pa.Array
    ids: np.ndarray
    doc: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    n_docs: int
    ascii: np.ndarray  # which texts are ASCII (a null text is), found by the same pass
    vocab_ascii: np.ndarray  # which `vocab` words are

    @classmethod
    def split(cls, texts: pa.Array) -> Words:
        """Split on Unicode whitespace like Python's `str.split()` (the 29 characters of `str.isspace`, those
        of Arrow's `utf8_split_whitespace` too): leading or trailing whitespace makes no word, a null text none.

        One compiled pass over the bytes finds the words and numbers the distinct ones in a hash table, so a
        word's features are computed once per distinct word (`vocab`) and spread with `ids`.
        """
        data, offsets = text_bytes(texts)
        valid = (
            np.asarray(texts.is_valid().to_numpy(zero_copy_only=False), np.bool_)
            if texts.null_count
            else np.ones(len(texts), np.bool_)
        )
        ids, counts, vocab_data, vocab_offsets, ascii, vocab_ascii = _split_whitespace(data, offsets, valid)
        vocab = pa.LargeStringArray.from_buffers(
            len(vocab_offsets) - 1, pa.py_buffer(vocab_offsets), pa.py_buffer(vocab_data)
        )
        word_offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(counts, out=word_offsets[1:])
        doc = np.repeat(np.arange(len(texts)), counts)
        return cls(vocab, ids, doc, counts, word_offsets, len(texts), ascii, vocab_ascii)

    @functools.cached_property
    def tokens(self) -> pa.Array:
        """The words in order, as strings."""
        return self.vocab.take(pa.array(self.ids, pa.int64()))

    def per_doc_sum(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.doc, weights=values, minlength=self.n_docs)

    def sum_by_doc(self, table: np.ndarray) -> np.ndarray:
        """Per document and column of `table` (a row per `vocab` word), the sum over the document's words:
        `per_doc_sum(table[ids, c])` for every column c in one pass, with the same additions in the same order."""
        return _doc_sums(self.offsets, self.ids, np.ascontiguousarray(table, np.float64))

    def distinct_by_doc(self, values: np.ndarray, n_values: int) -> np.ndarray:
        """Per document, how many distinct values in [0, n_values) its words have (`values`: one per `vocab`
        word, -1 for none)."""
        return _distinct_by_doc(self.offsets, self.ids, np.asarray(values, np.int64), n_values)


@numba.njit(cache=True, nogil=True)
def _split_whitespace(data, offsets, valid):  # noqa: ANN001, ANN202
    """The whitespace words of each valid text data[offsets[i]:offsets[i + 1]]: each word's id among the
    distinct words (numbered in order of first occurrence), the words per text, and the distinct words' bytes
    and offsets (a string array's buffers); which texts, and which distinct words, are ASCII."""
    n = len(offsets) - 1  # pragma: no cover (compiled)
    counts = np.zeros(n, np.int64)
    ascii = np.ones(n, np.bool_)
    bound = (offsets[n] - offsets[0] + n) // 2 + 1  # a text of b bytes holds (b + 1) // 2 words at most
    ids = np.empty(bound, np.int64)
    hashes = np.empty(bound, np.uint64)  # of each distinct word, where it first occurs, and its end
    first = np.empty(bound, np.int64)
    last = np.empty(bound, np.int64)
    vocab_ascii = np.empty(bound, np.bool_)
    size = 4096
    slots = np.full(size, -1, np.int64)
    n_vocab = 0
    vocab_bytes = 0
    w = 0
    basis = np.uint64(14695981039346656037)  # FNV-1a (`fnv1a_64`), computed along the scan
    prime = np.uint64(1099511628211)
    for i in range(n):
        if not valid[i]:
            continue
        end = offsets[i + 1]
        start = -1  # the start of the word being read, -1 between words
        h = basis
        skip = 0  # the bytes left of a multi-byte whitespace character
        high = np.uint8(0)  # the bytes of the word being read, or-ed: >= 128 when it is not ASCII
        for k in range(offsets[i], end + 1):  # the end of the text reads as whitespace
            if skip:
                skip -= 1
                continue
            if k == end:
                step = 1
            else:
                c = data[k]
                if c < 128:
                    step = 1 if (9 <= c <= 13 or 28 <= c <= 32) else 0
                else:
                    ascii[i] = False
                    # the lead bytes of the other whitespace characters
                    step = space_after(data, k, end) if c == 0xC2 or 0xE1 <= c <= 0xE3 else 0
                if step == 0:
                    if start < 0:
                        start = k
                        h = basis
                        high = np.uint8(0)
                    h = (h ^ np.uint64(c)) * prime
                    high |= c
                    continue
            skip = step - 1
            if start < 0:
                continue
            # a word ends at k: find it among the distinct words, or add it
            j = np.int64((h ^ (h >> np.uint64(32))) & np.uint64(size - 1))
            v = -1
            while slots[j] >= 0:
                u = slots[j]
                if hashes[u] == h and last[u] - first[u] == k - start and same_bytes(data, start, k, data, first[u]):
                    v = u
                    break
                j = (j + 1) & (size - 1)
            if v < 0:
                v = n_vocab
                slots[j] = v
                hashes[v], first[v], last[v] = h, start, k
                vocab_ascii[v] = high < 128
                vocab_bytes += k - start
                n_vocab += 1
                if 2 * n_vocab > size:  # grow the table, placing the words again by their hashes
                    size *= 2
                    slots = np.full(size, -1, np.int64)
                    for u in range(n_vocab):
                        g = hashes[u]
                        j = np.int64((g ^ (g >> np.uint64(32))) & np.uint64(size - 1))
                        while slots[j] >= 0:
                            j = (j + 1) & (size - 1)
                        slots[j] = u
            ids[w] = v
            w += 1
            counts[i] += 1
            start = -1
    vocab_data = np.empty(vocab_bytes, np.uint8)
    vocab_offsets = np.zeros(n_vocab + 1, np.int64)
    b = 0
    for v in range(n_vocab):
        for q in range(first[v], last[v]):
            vocab_data[b] = data[q]
            b += 1
        vocab_offsets[v + 1] = b
    return ids[:w].copy(), counts, vocab_data, vocab_offsets, ascii, vocab_ascii[:n_vocab].copy()


@numba.njit(cache=True, nogil=True)
def _distinct_by_doc(offsets: np.ndarray, ids: np.ndarray, values: np.ndarray, n_values: int) -> np.ndarray:
    out = np.zeros(len(offsets) - 1, np.int64)  # pragma: no cover (compiled)
    seen = np.full(n_values, -1, np.int64)  # the last document each value was counted in
    for d in range(len(offsets) - 1):
        for w in range(offsets[d], offsets[d + 1]):
            v = values[ids[w]]
            if v >= 0 and seen[v] != d:
                seen[v] = d
                out[d] += 1
    return out


@numba.njit(cache=True, nogil=True)
def _doc_sums(offsets: np.ndarray, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    out = np.zeros((len(offsets) - 1, table.shape[1]))  # pragma: no cover (compiled)
    for d in range(len(offsets) - 1):
        for w in range(offsets[d], offsets[d + 1]):
            for c in range(table.shape[1]):
                out[d, c] += table[ids[w], c]
    return out


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """`num / den` elementwise, 0 where `den` is 0 (an empty document has no fraction of anything)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def byte_counts(texts: pa.Array, marked: np.ndarray) -> np.ndarray:
    """Per text, how many of its bytes are marked in `marked` (a lookup table of 256 booleans)."""
    data, offsets = text_bytes(texts)
    return _byte_counts(data, offsets, np.ascontiguousarray(marked, np.int64))


@numba.njit(cache=True, nogil=True)
def _byte_counts(data: np.ndarray, offsets: np.ndarray, marked: np.ndarray) -> np.ndarray:
    out = np.zeros(len(offsets) - 1, np.int64)  # pragma: no cover (compiled)
    for i in range(len(offsets) - 1):
        n = 0
        for k in range(offsets[i], offsets[i + 1]):
            n += marked[data[k]]
        out[i] = n
    return out


def byte_ranges(
    texts: pa.Array, starts: np.ndarray, ends: np.ndarray, data: np.ndarray | None = None
) -> pa.Array:
    """The ranges [start, end) of `text_bytes(texts)` (or of `data`, bytes in their place) as a string array.

    The ranges are in order and do not overlap: they become every other string of one array over the bytes.
    """
    if data is None:
        data, _ = text_bytes(texts)
    if not len(starts):
        return pa.array([], pa.large_string())
    bounds = np.empty(2 * len(starts), np.int64)
    bounds[0::2], bounds[1::2] = starts, ends
    pieces = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(data))
    return pieces.take(pa.array(np.arange(0, len(bounds) - 1, 2)))


def per_doc(doc: np.ndarray, values: np.ndarray | None, n_docs: int) -> np.ndarray:
    """Sum of `values` (or a count, when None) per document."""
    return np.bincount(doc, weights=values, minlength=n_docs)


# Texts of printable ASCII, tabs and newlines: on them Python's `str` methods (`splitlines`, `strip`,
# `split`, `lower`), its `re` classes, Arrow's kernels and a byte-by-byte reading agree, so the line rules
# run vectorised (Arrow kernels, numpy over the bytes) over all their lines at once. Other texts (other
# whitespace or line breaks, non-ASCII) take the Python path, the rules' definition.
NOT_SIMPLE = r"[^\t\n\x20-\x7e]"


_NOT_SIMPLE_BYTE = ~ascii_table("\t\n" + "".join(map(chr, range(0x20, 0x7F))))  # every byte >= 0x80 too


def simple_texts(texts: pa.Array) -> np.ndarray:
    """Which texts are simple (see `NOT_SIMPLE`), as a numpy mask; a null is not.

    A UTF-8 text matches `NOT_SIMPLE` exactly when one of its bytes is not a tab, newline or printable ASCII
    byte (a non-ASCII character's bytes are all >= 0x80), so the bytes are counted rather than matched.
    """
    simple = byte_counts(texts, _NOT_SIMPLE_BYTE) == 0
    if texts.null_count:
        simple &= np.asarray(texts.is_valid().to_numpy(zero_copy_only=False), bool)
    return simple


@dataclass
class Lines:
    """The lines of a batch's simple texts, as `str.splitlines()` gives them, flattened.

    `docs` are the batch positions of the simple texts, `doc` the batch position of each line and `counts`
    the lines of each document of the batch (0 for the texts left to the Python path).
    """

    docs: np.ndarray
    text: pa.Array
    doc: np.ndarray
    counts: np.ndarray
    n_docs: int

    @classmethod
    def split(cls, texts: pa.Array, simple: np.ndarray) -> Lines:
        """On simple texts `splitlines` is a split at "\\n" less the empty piece after a final newline."""
        docs = np.flatnonzero(simple)
        lists = pc.split_pattern(texts.take(pa.array(docs, pa.int64())), "\n")
        offsets = lists.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        pieces = lists.flatten()
        doc = np.repeat(docs, np.diff(offsets))
        last = offsets[1:] - 1  # every text splits into one piece at least
        lengths = pc.binary_length(pieces).to_numpy(zero_copy_only=False)
        keep = np.ones(len(pieces), bool)
        keep[last[lengths[last] == 0]] = False
        if not keep.all():
            pieces = pieces.filter(pa.array(keep))
            doc = doc[keep]
        return cls(docs, pieces, doc, np.bincount(doc, minlength=len(texts)).astype(np.int64), len(texts))

    @functools.cached_property
    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per line: whether it holds a byte other than space and tab, and the positions of its first and last
        such byte in `text_bytes(self.text)` (0 when it has none): what `str.strip` keeps of a simple line."""
        data, offsets = text_bytes(self.text)
        return _solid_bounds(data, offsets)


@numba.njit(cache=True, nogil=True)
def _solid_bounds(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(offsets) - 1  # pragma: no cover (compiled)
    has = np.zeros(n, np.bool_)
    first = np.zeros(n, np.int64)
    last = np.zeros(n, np.int64)
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        while a < b and (data[a] == 32 or data[a] == 9):
            a += 1
        while b > a and (data[b - 1] == 32 or data[b - 1] == 9):
            b -= 1
        if b > a:
            has[i], first[i], last[i] = True, a, b - 1
    return has, first, last


@numba.njit(cache=True, nogil=True)
def space_after(data, k, end):  # noqa: ANN001, ANN201  # pragma: no cover (compiled)
    """The bytes of the whitespace character (`str.isspace`) starting at byte k of UTF-8 `data`, else 0."""
    c = data[k]
    if c < 128:
        return 1 if (9 <= c <= 13 or 28 <= c <= 32) else 0
    if c == 0xC2:  # U+0085, U+00A0
        return 2 if k + 1 < end and (data[k + 1] == 0x85 or data[k + 1] == 0xA0) else 0
    if k + 2 >= end:
        return 0
    return _three_byte_space(c, data[k + 1], data[k + 2])


@numba.njit(cache=True, nogil=True)
def space_before(data, start, k):  # noqa: ANN001, ANN201  # pragma: no cover (compiled)
    """The bytes of the whitespace character ending just before byte k (and not before `start`), else 0."""
    c = data[k - 1]
    if c < 128:
        return 1 if (9 <= c <= 13 or 28 <= c <= 32) else 0
    if k - 2 >= start and data[k - 2] == 0xC2 and (c == 0x85 or c == 0xA0):
        return 2
    if k - 3 >= start:
        return _three_byte_space(data[k - 3], data[k - 2], c)
    return 0


@numba.njit(cache=True, nogil=True)
def _three_byte_space(c0, c1, c2):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """3 when the bytes encode U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F or U+3000, else 0."""
    if c0 == 0xE1:
        return 3 if c1 == 0x9A and c2 == 0x80 else 0
    if c0 == 0xE2:
        if c1 == 0x80 and (0x80 <= c2 <= 0x8A or c2 == 0xA8 or c2 == 0xA9 or c2 == 0xAF):
            return 3
        return 3 if c1 == 0x81 and c2 == 0x9F else 0
    if c0 == 0xE3:
        return 3 if c1 == 0x80 and c2 == 0x80 else 0
    return 0


def find_duplicates(items: list[str]) -> tuple[int, int]:
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
