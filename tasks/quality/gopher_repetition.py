"""Gopher repetition rules (Rae et al. 2021): duplicated paragraphs, lines and word n-grams.

Every signal counts within one document, so each comes from a compiled pass over that document alone: over its
UTF-8 bytes for paragraphs and lines (equal pieces found with a hash table, then compared byte for byte), over
its words' ids in the batch's vocabulary (`Batch.words`) for n-grams.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.buffers import fnv1a_64, same_bytes, text_bytes
from refinery.tasks.quality._text import ratio, space_after, space_before
from refinery.tasks.quality.base import Batch, Rule, RuleFamily

TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)

_RULES = (
    Rule("gopher_dup_para_frac", "gopher_dup_para_frac", "max", "max_dup_para_frac"),
    Rule("gopher_dup_para_chars", "gopher_dup_para_char_frac", "max", "max_dup_para_char_frac"),
    Rule("gopher_dup_line_frac", "gopher_dup_line_frac", "max", "max_dup_line_frac"),
    Rule("gopher_dup_line_chars", "gopher_dup_line_char_frac", "max", "max_dup_line_char_frac"),
    *(Rule(f"gopher_top_{n}gram", f"gopher_top_{n}gram_char_frac", "max", f"max_top_{n}gram_char_frac")
      for n in TOP_NGRAMS),
    *(Rule(f"gopher_dup_{n}gram", f"gopher_dup_{n}gram_char_frac", "max", f"max_dup_{n}gram_char_frac")
      for n in DUP_NGRAMS),
)


_SEED = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


@numba.njit(cache=True, nogil=True)
def _find_or_add(table_key, table_count, mask, key):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """The slot of `key` in an open-addressing table (count 0: a free slot, now holding `key`)."""
    h = (key ^ (key >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
    j = np.int64((h ^ (h >> np.uint64(29))) & mask)
    while table_count[j] != 0 and table_key[j] != key:
        j = np.int64((np.uint64(j) + np.uint64(1)) & mask)
    table_key[j] = key
    return j


@numba.njit(cache=True, nogil=True)
def _ngram_chars(ids, offsets, wlen, top_n, dup_n):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """Per document: characters of its most frequent n-gram times its count (n in `top_n`), and characters of
    the words covered by a repeated n-gram (n in `dup_n`), one document at a time over its words.

    An n-gram's key is its document's seed mixed with its words one at a time (the n-gram keys are the
    (n - 1)-gram keys mixed with one more word), and n-grams are equal when their keys are. Mixing in a word
    is one-to-one, so two (n + 1)-grams share a key only if their n-gram prefixes do (barring a 64-bit
    collision): once no n-gram of a document repeats, no longer one does and its passes are skipped.
    """
    n_docs = len(offsets) - 1
    top = np.zeros((len(top_n), n_docs))
    dup = np.zeros((len(dup_n), n_docs))
    most = 0
    for d in range(n_docs):
        most = max(most, offsets[d + 1] - offsets[d])
    size = 2
    while size < 2 * most:
        size *= 2
    table_key = np.zeros(size, np.uint64)
    table_count = np.zeros(size, np.int64)
    keys = np.empty(most, np.uint64)
    slot = np.empty(most, np.int64)
    cover = np.zeros(most + 1, np.int64)
    for d in range(n_docs):
        a = offsets[d]
        m = offsets[d + 1] - a
        if m < 2:
            continue
        mask_size = 2
        while mask_size < 2 * m:
            mask_size *= 2
        mask = np.uint64(mask_size - 1)
        seed = (np.uint64(d) + np.uint64(1)) * _SEED
        for s in range(m):
            keys[s] = seed
        built = 0
        for n in range(2, max(top_n.max(), dup_n.max()) + 1):
            if n > m:
                break
            while built < n:  # the key of the built-gram at s, for every s with a word at s + built
                for s in range(m - built):
                    k = (keys[s] ^ np.uint64(ids[a + s + built])) * _MIX
                    keys[s] = k ^ (k >> np.uint64(31))
                built += 1
            count = m - n + 1
            table_count[:mask_size] = 0
            repeats = False
            for s in range(count):
                j = _find_or_add(table_key, table_count, mask, keys[s])
                table_count[j] += 1
                repeats |= table_count[j] > 1
                slot[s] = j
            if not repeats:  # no n-gram repeats, so no longer one does: each occurs once, the first is the top
                for t in range(len(top_n)):
                    if n <= top_n[t] <= m:
                        chars = top_n[t] - 1
                        for w in range(top_n[t]):
                            chars += wlen[a + w]
                        top[t, d] = np.float64(chars)
                break
            for t in range(len(top_n)):
                if top_n[t] == n:
                    best = 0
                    at = 0
                    for s in range(count):
                        c = table_count[slot[s]]
                        if c > best:
                            best, at = c, s
                    chars = n - 1
                    for w in range(at, at + n):
                        chars += wlen[a + w]
                    top[t, d] = np.float64(best) * np.float64(chars)
            for t in range(len(dup_n)):
                if dup_n[t] == n:
                    table_count[:mask_size] = 0
                    cover[: m + 1] = 0
                    for s in range(count):
                        j = slot[s]
                        if table_count[j] != 0:  # seen earlier in the document
                            cover[s] += 1
                            cover[s + n] -= 1
                        table_count[j] = 1
                    covered = 0
                    chars = 0
                    for w in range(m):
                        covered += cover[w]
                        if covered > 0:
                            chars += wlen[a + w]
                    dup[t, d] = np.float64(chars)
    return top, dup


@numba.njit(cache=True, nogil=True)
def _dup_pieces(data, starts, ends, table_piece, mask):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """(pieces equal to an earlier one, characters in them) among byte ranges of UTF-8 `data`, with a table of
    hashes; a character is a byte that does not continue a multi-byte sequence."""
    table_piece[: np.int64(mask) + 1] = -1
    dup = 0
    chars = 0
    for p in range(len(starts)):
        a, b = starts[p], ends[p]
        h = fnv1a_64(data, a, b)
        j = np.int64((h ^ (h >> np.uint64(32))) & mask)
        while True:
            q = table_piece[j]
            if q < 0:
                table_piece[j] = p
                break
            if ends[q] - starts[q] == b - a and same_bytes(data, starts[q], ends[q], data, a):
                dup += 1
                for k in range(a, b):
                    chars += (data[k] & 0xC0) != 0x80
                break
            j = np.int64((np.uint64(j) + np.uint64(1)) & mask)
    return dup, chars


@numba.njit(cache=True, nogil=True)
def _split_dups(data, lo, hi, run, starts, ends, table_piece):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """data[lo:hi] split at runs of `run` (1 or 2) newlines or more, as `re.split` does (a leading or trailing
    run leaves an empty piece): (pieces, pieces equal to an earlier one, characters in those)."""
    n = 0
    a = lo
    k = lo
    while k < hi:
        if data[k] == 10 and (run == 1 or (k + 1 < hi and data[k + 1] == 10)):
            starts[n], ends[n] = a, k
            n += 1
            while k < hi and data[k] == 10:
                k += 1
            a = k
        else:
            k += 1
    starts[n], ends[n] = a, hi
    n += 1
    mask_size = 2
    while mask_size < 2 * n:
        mask_size *= 2
    dup, chars = _dup_pieces(data, starts[:n], ends[:n], table_piece, np.uint64(mask_size - 1))
    return n, dup, chars


@numba.njit(cache=True, nogil=True)
def _para_line_dups(data, offsets, docs):  # noqa: ANN001, ANN202  # pragma: no cover (compiled)
    """Per document of `docs` (non-empty texts): paragraphs, repeated ones and their characters, and the same
    for lines, where the paragraphs are the pieces of `t.strip()` split at runs of two newlines or more and
    the lines those of `t` split at runs of newlines (`re.split`: a leading or trailing run leaves an empty
    piece). A newline byte is never part of another UTF-8 character."""
    out = np.zeros((len(docs), 6), np.int64)
    most = 0
    for i in range(len(docs)):
        most = max(most, offsets[docs[i] + 1] - offsets[docs[i]])
    size = 2
    while size < 2 * (most + 1):
        size *= 2
    table_piece = np.empty(size, np.int64)
    starts = np.empty(most + 1, np.int64)
    ends = np.empty(most + 1, np.int64)
    for i in range(len(docs)):
        lo, hi = offsets[docs[i]], offsets[docs[i] + 1]
        out[i, 3], out[i, 4], out[i, 5] = _split_dups(data, lo, hi, 1, starts, ends, table_piece)
        while lo < hi:  # `str.strip`
            width = space_after(data, lo, hi)
            if not width:
                break
            lo += width
        while hi > lo:
            width = space_before(data, lo, hi)
            if not width:
                break
            hi -= width
        out[i, 0], out[i, 1], out[i, 2] = _split_dups(data, lo, hi, 2, starts, ends, table_piece)
    return out


class GopherRepetitionRules(RuleFamily):
    """Gopher repetition rules: every fraction is over the document's characters (or paragraphs/lines)."""

    name = "gopher_repetition"
    applies_to = "prose"
    rules = _RULES

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

    def signals(self, batch: Batch) -> dict[str, Any]:
        words = batch.words
        n_docs = len(batch)
        out: dict[str, np.ndarray] = {}
        para_frac, para_chars, line_frac, line_chars = (np.zeros(n_docs) for _ in range(4))
        text_len = pc.utf8_length(batch.arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        docs = np.flatnonzero(text_len > 0)
        if len(docs):
            data, offsets = text_bytes(batch.arr)
            found = _para_line_dups(data, offsets, docs).astype(np.float64)
            para_frac[docs], para_chars[docs] = found[:, 1] / found[:, 0], found[:, 2] / text_len[docs]
            line_frac[docs], line_chars[docs] = found[:, 4] / found[:, 3], found[:, 5] / text_len[docs]
        out.update(
            gopher_dup_para_frac=para_frac, gopher_dup_para_char_frac=para_chars,
            gopher_dup_line_frac=line_frac, gopher_dup_line_char_frac=line_chars,
        )
        wlen = pc.utf8_length(words.vocab).to_numpy(zero_copy_only=False).astype(np.int64)[words.ids]
        top, dup = _ngram_chars(words.ids, words.offsets, wlen, np.array(TOP_NGRAMS), np.array(DUP_NGRAMS))
        for t, n in enumerate(TOP_NGRAMS):  # the most frequent n-gram's characters (words joined by spaces)
            out[f"gopher_top_{n}gram_char_frac"] = ratio(top[t], text_len)
        for t, n in enumerate(DUP_NGRAMS):  # characters of the words covered by any repeated n-gram
            out[f"gopher_dup_{n}gram_char_frac"] = ratio(dup[t], text_len)
        return out
