"""Text normalisation before hashing, so that trivially different copies hash alike.

Deduplication compares documents after this step: Unicode NFC, optional case
folding, optional punctuation folding (every character that is not a letter,
digit or combining mark separates words), optional accent stripping and digit
folding, and whitespace collapsed to single spaces. The original text is never
changed; only the hashed form is normalised.

A batch is normalised with Arrow kernels into word lists, because building one
Python string per word costs more than the hashing that follows.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

_NOT_WORD = r"[^\p{L}\p{N}\p{M}]+"


class NormalizeConfig(BaseModel):
    """How text is folded before exact hashing and shingling."""

    model_config = ConfigDict(extra="forbid")

    lowercase: bool = True
    fold_punctuation: bool = True
    strip_accents: bool = False
    fold_digits: bool = False


def _nfc(arr: pa.Array) -> pa.Array:
    """Unicode NFC; ASCII texts (most of them) are already composed and are not touched."""
    ascii_mask = pc.string_is_ascii(arr)
    if pc.all(ascii_mask).as_py() is not False:
        return arr
    composed = [
        t if is_ascii else unicodedata.normalize("NFC", t)
        for t, is_ascii in zip(arr.to_pylist(), ascii_mask.to_pylist(), strict=True)
    ]
    return pa.array(composed, pa.large_string())


def normalize_words(texts: Sequence[str] | pa.Array, cfg: NormalizeConfig | None = None) -> pa.ListArray:
    """The normalised words of each text, as an Arrow list array (one list per text)."""
    cfg = cfg or NormalizeConfig()
    if not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), pa.large_string())
    arr = _nfc(texts.cast(pa.large_string()))
    if cfg.lowercase:
        arr = pc.utf8_lower(arr)
    if cfg.strip_accents:
        decomposed = [unicodedata.normalize("NFD", t) for t in arr.to_pylist()]
        arr = pc.replace_substring_regex(pa.array(decomposed, pa.large_string()), r"\p{Mn}+", "")
        arr = pa.array([unicodedata.normalize("NFC", t) for t in arr.to_pylist()], pa.large_string())
    if cfg.fold_digits:
        arr = pc.replace_substring_regex(arr, r"\p{Nd}+", "0")
    if not cfg.fold_punctuation:
        return pc.utf8_split_whitespace(arr)
    lists = pc.split_pattern_regex(arr, _NOT_WORD)
    # Splitting on separators leaves empty strings where a text starts or ends with one.
    flat = lists.flatten()
    keep = pc.not_equal(pc.binary_length(flat), 0).to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    new_offsets = kept_before[offsets]
    return pa.LargeListArray.from_arrays(pa.array(new_offsets, pa.int64()), flat.filter(pa.array(keep)))


def join_words(words: pa.ListArray) -> list[str]:
    """The normalised text of each document: its words joined by single spaces."""
    if words.type.value_type == pa.large_string():
        sep = pa.scalar(" ", pa.large_string())
    else:
        sep = pa.scalar(" ", pa.string())
    return pc.binary_join(words, sep).to_pylist()


def normalize(text: str, cfg: NormalizeConfig | None = None) -> str:
    """The normalised form of one text (what exact deduplication compares)."""
    return join_words(normalize_words([text], cfg))[0]


def text_hashes(normalized: Sequence[str]) -> list[bytes]:
    """128-bit content hashes of normalised texts: equal hash, equal text."""
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in normalized]
