"""Byte-level helpers over Arrow string buffers, shared by the filter's rule families and the safety lists.

They live outside `refinery.tasks.quality` so that `refinery.tasks.safety`, which that package imports, can
use them too without an import cycle.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa


def text_bytes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a (large) string array as one numpy array, and the offsets of each text in it."""
    texts = texts.cast(pa.large_string())
    buffers = texts.buffers()
    offsets = np.frombuffer(buffers[1], np.int64, count=len(texts) + 1, offset=texts.offset * 8)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def ascii_table(chars: str) -> np.ndarray:
    """A 256-entry lookup table marking the bytes of `chars` (ASCII)."""
    table = np.zeros(256, bool)
    table[list(chars.encode("ascii"))] = True
    return table


ASCII_LOWER = np.arange(256, dtype=np.uint8)
ASCII_LOWER[65:91] += 32


@numba.njit(cache=True, nogil=True)
def same_bytes(x, a, b, y, c):  # noqa: ANN001, ANN201  # pragma: no cover (compiled)
    """Whether x[a:b] equals y[c:c + b - a], byte for byte (the caller has checked that the lengths match)."""
    for k in range(b - a):
        if x[a + k] != y[c + k]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def fnv1a_64(data, a, b):  # noqa: ANN001, ANN201  # pragma: no cover (compiled)
    """64-bit FNV-1a of data[a:b]: the key of the open-addressing tables that find repeated byte ranges."""
    h = np.uint64(14695981039346656037)
    for k in range(a, b):
        h = (h ^ np.uint64(data[k])) * np.uint64(1099511628211)
    return h
