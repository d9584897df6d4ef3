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
