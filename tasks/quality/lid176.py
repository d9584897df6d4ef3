"""fastText's lid.176 evaluated over a whole Arrow batch at once, giving fastText's own labels and probabilities.

The `fasttext` binding classifies one Python string per call: it copies the text into a C++ stream, cuts it into
words, looks every character n-gram up in a hash map (the compressed model keeps 42,765 of its 2,000,000
buckets) and decodes each row from its product-quantised form. Here the model is read once from the same
`lid.176.ftz`: its rows are decoded into one float32 table, the kept buckets into a flat bucket-to-row array, and
one compiled loop (numba, without the GIL, so threads split a batch) walks the UTF-8 bytes of every text of the
batch in place. Words repeat, so the loop finds each distinct word's rows (its dictionary row and its kept
n-grams, the costly part: hashing ~15 n-grams and reading an 8 MB bucket table) once per call and keeps their
ids in a small cache, then adds the rows one at a time wherever the word occurs, as fastText does. Every step
repeats fastText's arithmetic in the same order and precision (FNV-1a over signed chars, n-grams of 2-4
characters of `<word>`, the float32 sum of rows divided by their count, the hierarchical softmax walked depth
first with its pruning), so the labels and probabilities are those of `fasttext`'s
`predict(text + "\\n", 1, 0.0)`; tests/test_lid176.py compares them on random Unicode and real documents.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from refinery.tasks.buffers import same_bytes

FILE_MAGIC = 793712314
LABEL = b"__label__"
EOS = b"</s>"
HS_LOSS = 1  # fastText's loss_name::hs
SUPERVISED = 3  # model_name::sup
# Texts per thread at least: each thread keeps its own word cache, which pays off over many texts (and the
# filter stage already computes batches on several threads).
MIN_THREAD_DOCS = 8192
# The word cache of one `_classify` call (see `_word_rows`): at most this many table slots (rounded down to a
# power of two, half of them used at most: 4 MiB) and this many cached input-row ids (4 MiB). Past either,
# words are still classified, just not cached.
CACHE_SLOTS = 1 << 17
CACHE_IDS = 1 << 20
# What a word does: adds its rows, is skipped (a label), or adds the row of "</s>" and ends the line.
WORD, SKIP, END = 0, 1, 2


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_THREADS = max(1, min(4, _cpus()))  # threads one call splits a batch across


@dataclass(frozen=True)
class Lid176:
    """The arrays of a supervised, quantised fastText model with a hierarchical softmax, as the kernel reads them."""

    rows: np.ndarray  # (words + kept buckets, dim) float32: each input row decoded, norm * centroid
    bucket_rows: np.ndarray  # (buckets,) int32: the input row of an n-gram bucket, -1 where it was pruned
    word_hash: np.ndarray  # (entries,) uint32: FNV-1a of each dictionary entry (words, then labels)
    word_bytes: np.ndarray  # uint8: the entries' bytes, one after the other
    word_offsets: np.ndarray  # (entries + 1,) int64
    slots: np.ndarray  # open-addressing table over word_hash: entry index or -1
    out: np.ndarray  # (labels, dim) float32: row i for inner node labels + i of the label tree
    left: np.ndarray  # (2 * labels - 1,) int32: tree children, -1 at leaves
    right: np.ndarray
    labels: tuple[str, ...]  # language code of each leaf
    nwords: int
    eos: int  # the entry of "</s>", which ends every line
    minn: int
    maxn: int


def _label_tree(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """fastText's Huffman tree over the label counts (`HierarchicalSoftmaxLoss::buildTree`), children only."""
    osz = len(counts)
    count = [int(c) for c in counts] + [10**15] * (osz - 1)
    left, right = [-1] * (2 * osz - 1), [-1] * (2 * osz - 1)
    leaf, node = osz - 1, osz
    for i in range(osz, 2 * osz - 1):
        mini = [0, 0]
        for j in range(2):
            if leaf >= 0 and count[leaf] < count[node]:
                mini[j], leaf = leaf, leaf - 1
            else:
                mini[j], node = node, node + 1
        left[i], right[i] = mini
        count[i] = count[mini[0]] + count[mini[1]]
    return np.array(left, np.int32), np.array(right, np.int32)


def fnv1a(data: bytes) -> int:
    """fastText's word hash: FNV-1a over the bytes read as signed chars."""
    h = 2166136261
    for b in data:
        h = ((h ^ (b if b < 128 else b | 0xFFFFFF00)) * 16777619) & 0xFFFFFFFF
    return h


def load_lid176(path: Path) -> Lid176:
    """Read a quantised supervised fastText model (`.ftz`) with a hierarchical softmax, such as lid.176."""
    buf = path.read_bytes()
    pos = 0

    def read(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return values

    magic, _version = read("<ii")
    if magic != FILE_MAGIC:
        raise ValueError(f"{path} is not a fastText model")
    dim, _ws, _epoch, _min_count, _neg, word_ngrams, loss, model, bucket, minn, maxn, _lr, _t = read("<12id")
    if model != SUPERVISED or loss != HS_LOSS or word_ngrams != 1:
        raise ValueError(f"{path}: only a supervised model with a hierarchical softmax and no word n-grams is read")
    size, nwords, nlabels, _ntokens, pruned = read("<iiiqq")
    words: list[bytes] = []
    counts: list[int] = []
    for _ in range(size):
        end = buf.index(b"\0", pos)
        words.append(buf[pos:end])
        pos = end + 1
        count, _kind = read("<qb")
        counts.append(count)
    pairs = np.frombuffer(buf, "<i4", 2 * pruned, pos).reshape(-1, 2)
    pos += 8 * pruned
    (quantised,) = read("<?")
    qnorm, m, n, codesize = read("<?qqi")
    if not quantised or n != dim:
        raise ValueError(f"{path}: expected a quantised input matrix")
    codes = np.frombuffer(buf, np.uint8, codesize, pos)
    pos += codesize
    pq_dim, nsubq, dsub, lastdsub = read("<iiii")
    centroids = np.frombuffer(buf, "<f4", pq_dim * 256, pos)
    pos += pq_dim * 256 * 4
    norms = np.ones(m, np.float32)
    if qnorm:
        norm_codes = np.frombuffer(buf, np.uint8, m, pos)
        pos += m
        npq_dim, *_ = read("<iiii")
        norm_centroids = np.frombuffer(buf, "<f4", npq_dim * 256, pos)
        pos += npq_dim * 256 * 4
        norms = norm_centroids[norm_codes.astype(np.int64) * npq_dim].astype(np.float32)
    (qout,) = read("<?")
    if qout:
        raise ValueError(f"{path}: a quantised output matrix is not supported")
    out_m, out_n = read("<qq")
    out = np.frombuffer(buf, "<f4", out_m * out_n, pos).reshape(out_m, out_n).astype(np.float32)

    # ProductQuantizer::addcode adds norm * centroid, rounded to float32, for each sub-quantiser in turn.
    codes = codes.reshape(m, nsubq).astype(np.int64)
    rows = np.empty((m, dim), np.float32)
    for q in range(nsubq):
        d = lastdsub if q == nsubq - 1 else dsub
        base = q * 256 * dsub
        for k in range(d):
            rows[:, q * dsub + k] = norms * centroids[base + codes[:, q] * d + k]
    bucket_rows = np.full(bucket, -1, np.int32)
    bucket_rows[pairs[:, 0]] = nwords + pairs[:, 1]

    word_hash = np.array([fnv1a(w) for w in words], np.uint32)
    nslots = 1 << (4 * size).bit_length()
    slots = np.full(nslots, -1, np.int32)
    for i, h in enumerate(word_hash.tolist()):
        j = h & (nslots - 1)
        while slots[j] != -1:
            j = (j + 1) & (nslots - 1)
        slots[j] = i
    offsets = np.zeros(size + 1, np.int64)
    offsets[1:] = np.cumsum([len(w) for w in words])
    left, right = _label_tree(counts[nwords:])
    return Lid176(
        rows=rows,
        bucket_rows=bucket_rows,
        word_hash=word_hash,
        word_bytes=np.frombuffer(b"".join(words), np.uint8).copy(),
        word_offsets=offsets,
        slots=slots,
        out=out,
        left=left,
        right=right,
        labels=tuple(w.decode().removeprefix(LABEL.decode()) for w in words[nwords:]),
        nwords=nwords,
        eos=words.index(EOS),
        minn=minn,
        maxn=maxn,
    )


_LABEL_PREFIX = np.frombuffer(LABEL, np.uint8).copy()
_EOS_BYTES = np.frombuffer(EOS, np.uint8).copy()


@numba.njit(cache=True, nogil=True, inline="always")
def _step(h: np.uint32, byte: np.uint8) -> np.uint32:
    # FNV-1a over a signed char: bytes >= 0x80 are sign-extended before the xor
    x = np.uint32(byte) if byte < 128 else np.uint32(byte) | np.uint32(0xFFFFFF00)
    return np.uint32((h ^ x) * np.uint32(16777619))


@numba.njit(cache=True, nogil=True, inline="always")
def _is_space(byte: np.uint8) -> bool:
    # fastText's readWord separators: space, \n, \r, \t, \v, \f, \0
    return byte == 32 or byte == 10 or byte == 13 or byte == 9 or byte == 11 or byte == 12 or byte == 0


@numba.njit(cache=True, nogil=True)
def _find(data, a, b, h, word_hash, word_bytes, word_offsets, slots):  # noqa: ANN001, ANN202
    mask = len(slots) - 1
    j = np.int64(h) & mask
    while slots[j] != -1:
        w = slots[j]
        if word_hash[w] == h:
            s, e = word_offsets[w], word_offsets[w + 1]
            if e - s == b - a and same_bytes(word_bytes, s, e, data, a):
                return w
        j = (j + 1) & mask
    return -1


@numba.njit(cache=True, nogil=True)
def _subword_rows(data, a, b, bucket_rows, minn, maxn, ids, at):  # noqa: ANN001, ANN202
    """Dictionary::computeSubwords over `<` + data[a:b] + `>`: each kept n-gram's row, written from ids[at];
    where they end."""
    length = b - a + 2
    nbuckets = np.uint32(len(bucket_rows))
    for i in range(length):
        c = np.uint8(60) if i == 0 else (np.uint8(62) if i == length - 1 else data[a + i - 1])
        if (c & 0xC0) == 0x80:
            continue
        h = np.uint32(2166136261)
        j = i
        n = 1
        while j < length and n <= maxn:
            c = np.uint8(60) if j == 0 else (np.uint8(62) if j == length - 1 else data[a + j - 1])
            h = _step(h, c)
            j += 1
            while j < length:
                c = np.uint8(62) if j == length - 1 else data[a + j - 1]
                if (c & 0xC0) != 0x80:
                    break
                h = _step(h, c)
                j += 1
            if n >= minn and not (n == 1 and (i == 0 or j == length)):
                r = bucket_rows[h % nbuckets]
                if r >= 0:
                    ids[at] = r
                    at += 1
            n += 1
    return at


@numba.njit(cache=True, nogil=True)
def _word_rows(  # noqa: ANN202
    data, a, b, h, bucket_rows, word_hash, word_bytes, word_offsets, slots,  # noqa: ANN001
    nwords, eos, minn, maxn, label_prefix, ids, at,  # noqa: ANN001
):
    """What the word data[a:b] (FNV-1a `h`) does to the hidden vector: (kind, end), its rows in ids[at:end].

    The rows are those fastText adds, in its order: the word's own row if it is in the dictionary, then its
    kept n-grams. They depend on the word's bytes alone, so `_classify` computes them once per distinct word
    and adds them again, one row at a time, wherever the word repeats: the float32 sums stay fastText's.
    """
    w = _find(data, a, b, h, word_hash, word_bytes, word_offsets, slots)
    if w >= nwords:  # a label of the model: not a word
        return SKIP, at
    if w < 0 and b - a >= len(label_prefix):
        is_label = True
        for q in range(len(label_prefix)):
            if data[a + q] != label_prefix[q]:
                is_label = False
                break
        if is_label:  # fastText reads any token starting with __label__ as a label
            return SKIP, at
    if w >= 0:
        ids[at] = w
        at += 1
        if w == eos:  # "</s>" inside the text ends fastText's line there
            return END, at
    return WORD, _subword_rows(data, a, b, bucket_rows, minn, maxn, ids, at)


@numba.njit(cache=True, nogil=True)
def _cached(table, data, a, length, key):  # noqa: ANN001, ANN202
    """The slot of the word data[a:a + length] (key: length << 32 | hash) in the cache table, or the empty
    slot where it would go."""
    mask = len(table) - 1
    j = key & mask
    while table[j, 0] != -1:
        s = table[j, 0]
        if table[j, 1] == key and same_bytes(data, s, s + length, data, a):
            return j
        j = (j + 1) & mask
    return j


@numba.njit(cache=True, nogil=True)
def _grown(table):  # noqa: ANN001, ANN202
    """The cache table with twice the slots, its entries placed again: a call starts small and grows as it
    meets new words, so the slots of the words in use stay close together in the CPU caches."""
    bigger = np.full((2 * len(table), table.shape[1]), -1, np.int64)
    mask = len(bigger) - 1
    for i in range(len(table)):
        if table[i, 0] != -1:
            j = table[i, 1] & mask
            while bigger[j, 0] != -1:
                j = (j + 1) & mask
            bigger[j] = table[i]
    return bigger


@numba.njit(cache=True, nogil=True)
def _best_leaf(root, hidden, out, left, right, osz, floor, nodes, scores):  # noqa: ANN001, ANN202
    """HierarchicalSoftmaxLoss::dfs for k = 1, with a stack: (leaf, log-probability), leaf -1 when none is found.

    Children are visited left first, each pruned against the best leaf found by then, as the recursion does.
    """
    best_leaf = -1
    best = np.float32(0.0)
    top = 0
    nodes[0] = root
    scores[0] = 0.0
    while top >= 0:
        node = nodes[top]
        score = scores[top]
        top -= 1
        if score < floor or (best_leaf >= 0 and score < best):
            continue
        if left[node] == -1 and right[node] == -1:
            best_leaf = node
            best = score
            continue
        f = np.float32(0.0)
        row = node - osz
        for d in range(hidden.shape[0]):
            f += out[row, d] * hidden[d]
        f = np.float32(1.0 / np.float64(np.float32(1.0) + np.float32(math.exp(-f))))
        lo = np.float32(math.log(np.float64(np.float32(1.0 - np.float64(f))) + 1e-5))
        hi = np.float32(math.log(np.float64(f) + 1e-5))
        nodes[top + 1] = right[node]
        scores[top + 1] = np.float32(score + hi)
        nodes[top + 2] = left[node]
        scores[top + 2] = np.float32(score + lo)
        top += 2
    return best_leaf, best


@numba.njit(cache=True, nogil=True)
def _classify(  # noqa: ANN202
    data, offsets, lo, hi, rows, bucket_rows, word_hash, word_bytes, word_offsets, slots, out, left, right,  # noqa: ANN001
    nwords, eos, minn, maxn, label_prefix, eos_bytes, leaf, prob, spaced, cache_slots, cache_ids,  # noqa: ANN001
):
    """Classify texts lo..hi-1 of an Arrow string buffer as fastText's predictLine on `text + "\\n"` would.

    Words repeat (most of a text's words are among a few thousand), so each distinct word's rows are found
    once per call and kept in a cache: an open-addressing table over the word's length and hash, at most
    half full and of at most `cache_slots` slots, each holding (start of the word's first occurrence in
    `data`, key, first id, id count * 4 + kind), and a buffer of at most `cache_ids` row ids. A full cache
    only stops caching: the results never depend on its size.
    """
    dim = rows.shape[1]
    nsub = max(0, maxn - minn + 1)  # n-gram lengths per character
    nbytes = offsets[hi] - offsets[lo]
    nslots = 2
    while 2 * nslots <= min(1024, cache_slots, nbytes):  # small at first: grown up to cache_slots as needed
        nslots *= 2
    table = np.full((nslots, 4), -1, np.int64)
    entries = 0
    ids = np.empty(min(cache_ids, (2 * nsub + 1) * nbytes + 16), np.int32)
    used = 0
    scratch = np.empty(0, np.int32)  # the rows of a word that does not fit in `ids`
    osz = (left.shape[0] + 1) // 2
    floor = np.float32(math.log(np.float64(np.float32(0.0)) + 1e-5))
    hidden = np.empty(dim, np.float32)
    nodes = np.empty(left.shape[0] + 1, np.int64)  # the stack holds at most one pending sibling per level
    scores = np.empty(left.shape[0] + 1, np.float32)
    for t in range(lo, hi):
        start, stop = offsets[t], offsets[t + 1]
        # Python's str.strip() would leave something: an ASCII byte that is not whitespace (bytes >= 0x80 may be
        # Unicode spaces: flagged for the caller to check)
        spaced[t] = 0
        for k in range(start, stop):
            c = data[k]
            if c >= 128:
                spaced[t] = 2
            elif not (c == 32 or (9 <= c <= 13) or (28 <= c <= 31)):
                spaced[t] = 1
                break
        hidden[:] = 0.0
        count = 0
        ended = False
        k = start
        while k < stop:
            if _is_space(data[k]):
                k += 1
                continue
            a = k
            h = np.uint32(2166136261)
            while k < stop and not _is_space(data[k]):
                h = _step(h, data[k])
                k += 1
            b = k
            key = np.int64(b - a) << 32 | np.int64(h)
            slot = _cached(table, data, a, b - a, key)
            if table[slot, 0] != -1:  # seen before in this call
                first, kind = table[slot, 2], table[slot, 3] & 3
                end, buf = first + (table[slot, 3] >> 2), ids
            else:
                bound = 1 + nsub * (b - a + 2)  # the most rows a word of b - a bytes can have
                fits = used + bound <= len(ids)
                if not fits and len(scratch) < bound:
                    scratch = np.empty(max(bound, 2 * len(scratch)), np.int32)
                buf, first = (ids, used) if fits else (scratch, 0)
                kind, end = _word_rows(data, a, b, h, bucket_rows, word_hash, word_bytes, word_offsets, slots,
                                       nwords, eos, minn, maxn, label_prefix, buf, first)
                if fits and 2 * (entries + 1) > len(table) and 2 * len(table) <= cache_slots:
                    table = _grown(table)
                    slot = _cached(table, data, a, b - a, key)
                if fits and 2 * (entries + 1) <= len(table):  # in the cache's buffer, with room: keep it
                    table[slot, 0], table[slot, 1], table[slot, 2] = a, key, first
                    table[slot, 3] = (end - first) * 4 + kind
                    used = end
                    entries += 1
            if kind == SKIP:
                continue
            for i in range(first, end):  # one row at a time, in fastText's order: the same float32 sums
                r = buf[i]
                for d in range(dim):
                    hidden[d] += rows[r, d]
            count += end - first
            if kind == END:
                ended = True
                break
        if not ended:
            for d in range(dim):
                hidden[d] += rows[eos, d]
            count += 1
        scale = np.float32(1.0 / count)
        for d in range(dim):
            hidden[d] *= scale
        found, logp = _best_leaf(2 * osz - 2, hidden, out, left, right, osz, floor, nodes, scores)
        leaf[t] = found
        prob[t] = np.float32(math.exp(logp)) if found >= 0 else np.float32(0.0)


@functools.cache
def lid176_model(path: Path) -> Lid176:
    """The model at `path`, read once per process."""
    return load_lid176(path)


def classify(
    model: Lid176, texts: pa.Array, threads: int | None = None, cache_slots: int = CACHE_SLOTS,
    cache_ids: int = CACHE_IDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leaf index (-1: no label), float32 probability and a word flag per text (a string array without nulls).

    The flag is 1 where the text has a non-space ASCII character, 2 where it has none but has non-ASCII
    bytes (a Unicode space or a word: the caller decides), 0 where it is only ASCII whitespace. `cache_slots`
    and `cache_ids` bound each thread's word cache: they change the speed, never the result (tests shrink
    them).
    """
    texts = texts.cast(pa.large_string())
    n = len(texts)
    leaf = np.empty(n, np.int32)
    prob = np.empty(n, np.float32)
    spaced = np.empty(n, np.uint8)
    if n == 0:
        return leaf, prob, spaced
    _, offsets_buf, data_buf = texts.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, n + 1, texts.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None and data_buf.size else np.zeros(1, np.uint8)
    args = (model.rows, model.bucket_rows, model.word_hash, model.word_bytes, model.word_offsets, model.slots,
            model.out, model.left, model.right, model.nwords, model.eos, model.minn, model.maxn,
            _LABEL_PREFIX, _EOS_BYTES, leaf, prob, spaced, cache_slots, cache_ids)
    threads = threads or min(MAX_THREADS, max(1, n // MIN_THREAD_DOCS))
    if threads <= 1:
        _classify(data, offsets, 0, n, *args)
        return leaf, prob, spaced
    cuts = np.linspace(0, n, threads + 1).astype(int).tolist()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(_classify, data, offsets, lo, hi, *args) for lo, hi in zip(cuts, cuts[1:], strict=False)]:
            f.result()
    return leaf, prob, spaced
