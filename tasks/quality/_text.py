"""Text helpers shared by the rule families: the whitespace word split, ratios, duplicate counting."""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """

    tokens: pa.Array
    doc: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    n_docs: int

    @classmethod
    def split(cls, texts: pa.Array) -> Words:
        """Split on Unicode whitespace like Python's `str.split()`: leading or trailing whitespace makes no word.

        Arrow's kernel yields an empty token for whitespace at either end of a text; those are removed here, so
        a document's word count does not depend on whether it ends with a newline.
        """
        lists = pc.utf8_split_whitespace(texts)
        offsets = lists.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        doc = np.repeat(np.arange(len(texts)), np.diff(offsets))
        tokens = lists.flatten()
        nonempty = pc.greater(pc.binary_length(tokens), 0).to_numpy(zero_copy_only=False)
        if not nonempty.all():
            tokens = tokens.filter(pa.array(nonempty))
            doc = doc[nonempty]
        counts = np.bincount(doc, minlength=len(texts)).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(tokens, doc, counts, offsets, len(texts))

    def per_doc_sum(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.doc, weights=values, minlength=self.n_docs)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """`num / den` elementwise, 0 where `den` is 0 (an empty document has no fraction of anything)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def repeated(keys: np.ndarray) -> np.ndarray:
    """Whether each key occurred earlier in `keys`: a hash table, several times faster than sorting them."""
    import pandas as pd  # here, not at the top: importing pandas slows every worker's start

    return pd.Series(keys, copy=False).duplicated(keep="first").to_numpy()


def repeated_in_doc(values: pa.Array, doc: np.ndarray) -> np.ndarray:
    """Whether each value occurred earlier in the same document (`find_duplicates`, for a whole batch)."""
    if not len(values):
        return np.zeros(0, bool)
    codes = pc.dictionary_encode(values)
    ids = codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return repeated(doc.astype(np.int64) * (len(codes.dictionary) + 1) + ids)


def text_bytes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a (large) string array as one numpy array, and the offsets of each text in it."""
    texts = texts.cast(pa.large_string())
    buffers = texts.buffers()
    offsets = np.frombuffer(buffers[1], np.int64, count=len(texts) + 1, offset=texts.offset * 8)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def byte_counts(texts: pa.Array, marked: np.ndarray) -> np.ndarray:
    """Per text, how many of its bytes are marked in `marked` (a lookup table of 256 booleans)."""
    data, offsets = text_bytes(texts)
    return np.diff(np.searchsorted(np.flatnonzero(marked[data]), offsets)).astype(np.int64)


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


def ascii_table(chars: str) -> np.ndarray:
    """A 256-entry lookup table marking the bytes of `chars` (ASCII)."""
    table = np.zeros(256, bool)
    table[list(chars.encode("ascii"))] = True
    return table


_WORD_BYTE = ascii_table(string.ascii_letters + string.digits + "_")
ASCII_LOWER = np.arange(256, dtype=np.uint8)
ASCII_LOWER[65:91] += 32


def ascii_words(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The lower-cased runs of [A-Za-z0-9_] of ASCII texts, flattened, and the text each belongs to.

    On ASCII text these are the words of a split at `[^\\p{L}\\p{N}\\p{M}_]+` after lower-casing, and the
    tokens of `\\w+`. Found with numpy over the bytes: a regular expression's split costs a match per word.
    """
    data, offsets = text_bytes(texts)
    word = _WORD_BYTE[data]
    boundary = np.zeros(len(data) + 1, bool)
    boundary[offsets] = True  # a text's first byte, and the end of the last
    prev_word = np.concatenate([[False], word[:-1]]) & ~boundary[:-1]
    next_word = np.concatenate([word[1:], [False]]) & ~boundary[1:]
    starts = np.flatnonzero(word & ~prev_word)
    ends = np.flatnonzero(word & ~next_word) + 1
    doc = np.searchsorted(offsets, starts, side="right") - 1
    return byte_ranges(texts, starts, ends, ASCII_LOWER[data]), doc


def per_doc(doc: np.ndarray, values: np.ndarray | None, n_docs: int) -> np.ndarray:
    """Sum of `values` (or a count, when None) per document."""
    return np.bincount(doc, weights=values, minlength=n_docs)


# Texts of printable ASCII, tabs and newlines: on them Python's `str` methods (`splitlines`, `strip`,
# `split`, `lower`), its `re` classes, Arrow's kernels and a byte-by-byte reading agree, so the line rules
# run vectorised (Arrow kernels, numpy over the bytes) over all their lines at once. Other texts (other
# whitespace or line breaks, non-ASCII) take the Python path, the rules' definition.
NOT_SIMPLE = r"[^\t\n\x20-\x7e]"


def simple_texts(texts: pa.Array) -> np.ndarray:
    """Which texts are simple (see `NOT_SIMPLE`), as a numpy mask; a null is not."""
    other = pc.match_substring_regex(texts, NOT_SIMPLE).fill_null(True)
    return ~np.asarray(other.to_numpy(zero_copy_only=False), bool)


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
