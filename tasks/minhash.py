"""MinHash signatures computed batch-wise with numpy, bit-identical to datasketch's.

Shingling and hashing word by word in Python costs as much as the hashing
itself, so a whole batch is shingled at once: words are split and
dictionary-encoded by Arrow, each distinct word is hashed once, and word
n-gram hashes are combined with vectorised integer arithmetic. The
permutations are datasketch's own (`MinHash(num_perm, seed).permutations`,
scheme `affine32`), applied the way `MinHash.update_batch` applies them, so a
signature here equals `datasketch.MinHash(num_perm, seed, hashfunc=int)` fed
the same shingle hashes (see `datasketch_minhash`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import LeanMinHash, MinHash
from datasketch.lsh import _optimal_param

MAX_HASH = np.uint32(0xFFFFFFFF)
# Odd 64-bit constants, one per word position in a shingle (up to 32 words).
_POSITION_MULT = (
    np.random.default_rng(0x5EED).integers(0, 1 << 62, size=32, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
)
_CHUNK_ELEMENTS = 1 << 19  # permutations x shingles per numpy step (2 MiB of uint32)
_word_cache: dict[str, int] = {}


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false positive + false negative areas around `threshold`.

    This is datasketch's `MinHashLSH` rule; weights sum to one. Cached: it integrates numerically
    over every (bands, rows) pair, a quarter of a second each time.
    """
    b, r = _optimal_param(threshold, num_perm, 1.0 - false_negative_weight, false_negative_weight)
    return int(b), int(r)


def _word_hashes(words: Sequence[str]) -> np.ndarray:
    """Stable 32-bit hashes of distinct words (the same in every process and run)."""
    cache = _word_cache
    if len(cache) > 2_000_000:
        cache.clear()
    out = np.empty(len(words), dtype=np.uint64)
    for i, w in enumerate(words):
        h = cache.get(w)
        if h is None:
            h = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=4).digest(), "little")
            cache[w] = h
        out[i] = h
    return out


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before its affine permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(words: pa.ListArray, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word n-grams of each document's normalised words.

    Returns `(hashes, offsets)`: the shingles of document i are
    `hashes[offsets[i]:offsets[i + 1]]`. A document shorter than `shingle_size`
    words yields one shingle of all its words, an empty document none.
    """
    if not 1 <= shingle_size <= len(_POSITION_MULT):
        raise ValueError(f"shingle_size must be between 1 and {len(_POSITION_MULT)}, got {shingle_size}")
    n_docs = len(words)
    word_offsets = words.offsets.to_numpy().astype(np.int64)
    word_offsets = word_offsets - word_offsets[0]
    flat = words.flatten()
    lengths = np.diff(word_offsets)
    if len(flat) == 0:
        return np.empty(0, np.uint32), np.zeros(n_docs + 1, np.int64)
    encoded = pc.dictionary_encode(flat)
    wh = _word_hashes(encoded.dictionary.to_pylist())[encoded.indices.to_numpy()]

    # Combine every window of `shingle_size` consecutive words; windows that cross
    # into the next document are discarded below.
    total = len(wh)
    padded = np.concatenate([wh, np.zeros(shingle_size, np.uint64)])
    combined = padded[:total] * _POSITION_MULT[0]
    for k in range(1, shingle_size):
        combined += padded[k : k + total] * _POSITION_MULT[k]
    n_shingles = np.maximum(lengths - shingle_size + 1, 0)
    doc_of = np.repeat(np.arange(n_docs), lengths)
    pos_in_doc = np.arange(total, dtype=np.int64) - word_offsets[:-1][doc_of]
    take = pos_in_doc < n_shingles[doc_of]
    short = np.flatnonzero((lengths > 0) & (lengths < shingle_size))
    for d in short:  # one shingle of all the words of a short document
        s, e = word_offsets[d], word_offsets[d + 1]
        combined[s] = (padded[s:e] * _POSITION_MULT[: e - s]).sum(dtype=np.uint64)
        take[s] = True
    hashes = (_fmix64(combined[take]) >> np.uint64(32)).astype(np.uint32)
    counts = np.bincount(doc_of[take], minlength=n_docs)
    offsets = np.zeros(n_docs + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return hashes, offsets


class MinHasher:
    """Applies datasketch's `affine32` permutations to shingle hashes, a batch at a time."""

    def __init__(self, num_perm: int = 128, seed: int = 1) -> None:
        self.num_perm = num_perm
        self.seed = seed
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)

    def signatures(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """`(n_docs, num_perm)` uint32 signatures; a document without shingles gets all `MAX_HASH`."""
        n_docs = len(offsets) - 1
        sigs = np.full((n_docs, self.num_perm), MAX_HASH, dtype=np.uint32)
        if len(hashes) == 0:
            return sigs
        mixed = _fmix32(hashes.astype(np.uint32))
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        ends = offsets[nonempty + 1]
        per_chunk = max(1, _CHUNK_ELEMENTS // self.num_perm)
        b = self.b[:, None]
        i = 0
        while i < len(nonempty):
            # Whole documents, about `per_chunk` shingles: the (num_perm, shingles) block stays in cache.
            lo = offsets[nonempty[i]]
            j = max(int(np.searchsorted(ends, lo + per_chunk, side="right")), i + 1)
            docs = nonempty[i:j]
            block = np.multiply.outer(self.a, mixed[lo : ends[j - 1]])
            block += b
            sigs[docs] = np.minimum.reduceat(block, offsets[docs] - lo, axis=1).T
            i = j
        return sigs

    def lean(self, signature: np.ndarray) -> LeanMinHash:
        """A datasketch `LeanMinHash` holding one signature (for `MinHashLSH` or `jaccard`)."""
        return LeanMinHash(seed=self.seed, hashvalues=signature, scheme="affine32")


def rensa_signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """`(n_docs, num_perm)` uint32 R-MinHash signatures from rensa (Rust), over the same shingle hashes.

    Rensa's permutations are its own, so these signatures differ from datasketch's
    (`MinHasher`) while estimating the same Jaccard similarity. A document without
    shingles gets all `MAX_HASH`, as with `MinHasher`. rensa is an optional dependency.
    """
    import rensa

    n_docs = len(offsets) - 1
    sigs = np.full((n_docs, num_perm), MAX_HASH, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    if len(nonempty) == 0:
        return sigs
    # Empty documents own no shingles: dropping their repeated offsets leaves the rows of the others.
    sub_offsets = (np.concatenate([offsets[:1], offsets[nonempty + 1]]) - offsets[0]).astype(np.uint64)
    flat = np.ascontiguousarray(hashes[offsets[0] : offsets[-1]], dtype=np.uint64)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, sub_offsets, num_perm, seed)
    sigs[nonempty] = np.array(matrix.to_rows(), dtype=np.uint32)
    return sigs


def datasketch_minhash(shingles: Sequence[int], num_perm: int = 128, seed: int = 1) -> MinHash:
    """The same signature computed by datasketch's own `MinHash` (reference for tests)."""
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme="affine32")
    m.update_batch([int(s) for s in shingles])
    return m


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """`(n_docs, bands)` int64 keys: two documents share a key in band j iff their rows agree there."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {signatures.shape[1]}")
    out = np.empty((signatures.shape[0], bands), dtype=np.uint64)
    for j in range(bands):
        block = signatures[:, j * rows : (j + 1) * rows].astype(np.uint64)
        h = np.full(signatures.shape[0], np.uint64(j + 1), np.uint64)
        for k in range(rows):
            h = _fmix64(h ^ (block[:, k] * _POSITION_MULT[k]))
        out[:, j] = h
    return out.view(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction of equal signature values (MinHash's Jaccard estimate)."""
    return (sig_a == sig_b).mean(axis=-1)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets of shingle hashes."""
    a = np.unique(a)
    b = np.unique(b)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
