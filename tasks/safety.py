"""Safety filters: a word block list and URL/domain block lists, as filter signals.

Both lists are plain files the user can replace (`filter.safety.words_file`,
`filter.safety.domains_file`) or extend (`extra_words`, `extra_domains`). The
defaults in `tasks/data/` are small placeholder lists written for this project:
they show the mechanism, they are not a moderation policy.

- Words: whole-word, case-insensitive matches. Documents are split into
  lower-cased words exactly as decontamination splits them (runs of letters,
  digits, marks and underscores, with Arrow) and single-word terms are looked
  up in one vectorised `is_in`; a term with spaces or punctuation ("some
  phrase") is matched by one regular expression with word boundaries, spaces
  matching any run of whitespace. The signals are the number of matches and
  their fraction of the document's words, so either a count or a fraction
  threshold can drop a document (`safety_blocklist_word`).
- Domains: a listed domain blocks itself and every subdomain. A document whose
  `meta` has a `url` (WARC records) on a blocked domain is dropped
  (`safety_blocked_domain`); with `check_text_urls`, URLs written in the text
  are checked too (`safety_blocked_url_in_text`).

The rule family (settings, rules, which documents it judges) is `refinery.tasks.quality.safety`;
this module holds the lists and the matching.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.tasks.decontaminate import split_words

if TYPE_CHECKING:
    from refinery.tasks.quality.safety import SafetyRules

DATA_DIR = Path(__file__).with_name("data")
DEFAULT_WORDS = DATA_DIR / "blocklist_words.txt"
DEFAULT_DOMAINS = DATA_DIR / "blocklist_domains.txt"
_WORD = re.compile(r"\w+")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


def load_lists(
    words_file: str | Path | None = None,
    domains_file: str | Path | None = None,
    extra_words: Sequence[str] = (),
    extra_domains: Sequence[str] = (),
) -> BlockLists:
    """The block lists (None: the bundled ones) plus extra terms, loaded once per process until a file changes."""
    files = (_stat(words_file or DEFAULT_WORDS), _stat(domains_file or DEFAULT_DOMAINS))
    return BlockLists.load(*files, tuple(extra_words), tuple(extra_domains))


def _stat(path: str | Path) -> tuple[str, int, int]:
    """(path, size, mtime): the cache key of a loaded list, so an edited file is read again."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"block list {p} does not exist; fix filter.safety.words_file/domains_file")
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def read_list(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a block-list file, stripped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"block list {p} does not exist; fix filter.safety.words_file/domains_file")
    lines = (line.strip() for line in p.read_text(encoding="utf-8").splitlines())
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
    phrases: re.Pattern[str] | None
    phrase_heads: frozenset[str]  # first words of the phrases: only documents with one are searched
    domains: frozenset[str]
    digest: str

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def load(
        words_file: tuple[str, int, int],
        domains_file: tuple[str, int, int],
        extra_words: tuple[str, ...],
        extra_domains: tuple[str, ...],
    ) -> BlockLists:
        terms = sorted({t.strip().lower() for t in [*read_list(words_file[0]), *extra_words] if t.strip()})
        domains = sorted({normalize_domain(d) for d in [*read_list(domains_file[0]), *extra_domains]} - {""})
        single = frozenset(t for t in terms if _WORD.fullmatch(t))
        multi = sorted((t for t in terms if t not in single), key=len, reverse=True)
        phrases = None
        if multi:
            body = "|".join(r"\s+".join(re.escape(part) for part in t.split()) for t in multi)
            phrases = re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)
        digest = hashlib.sha256(json.dumps([terms, domains]).encode()).hexdigest()
        heads = frozenset(h[0] for h in (split_words([t])[0].to_pylist() for t in multi) if h)
        return BlockLists(single, phrases, heads, frozenset(domains), digest)

    def word_hits(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per document: block-list matches, words, and the first matched term (vectorised with Arrow)."""
        words, starts = split_words(texts)
        n = len(texts)
        counts = np.diff(starts)
        doc = np.repeat(np.arange(n), counts)
        listed = pc.is_in(words, value_set=pa.array(sorted(self.words), pa.large_string()))
        hit = listed.to_numpy(zero_copy_only=False) if len(words) else np.zeros(0, bool)
        hits = np.bincount(doc[hit], minlength=n).astype(np.int64)
        first = [""] * n
        if hit.any():
            hit_at = np.flatnonzero(hit)
            docs, j = np.unique(doc[hit_at], return_index=True)
            for d, w in zip(docs.tolist(), words.take(pa.array(hit_at[j])).to_pylist(), strict=True):
                first[d] = w
        if self.phrases is not None and len(words):
            head = pc.is_in(words, value_set=pa.array(sorted(self.phrase_heads), pa.large_string()))
            for i in np.unique(doc[head.to_numpy(zero_copy_only=False)]).tolist():
                found = self.phrases.findall(texts[i] or "")
                if found:
                    hits[i] += len(found)
                    first[i] = first[i] or " ".join(found[0].lower().split())
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


def safety_signals(
    texts: Sequence[str | None], metas: Sequence[str | None] | None, rules: SafetyRules
) -> dict[str, pa.Array]:
    """Signal columns for a batch: block-list word matches, blocked meta URL, blocked URLs in the text."""
    lists = rules.lists()
    n = len(texts)
    host_col: list[str] = [""] * n
    blocked = np.zeros(n, bool)
    text_urls = np.zeros(n, np.int64)
    hits, words, first = lists.word_hits(texts)
    for i in range(n):
        url = _meta_url(metas[i]) if metas is not None else ""
        if url:
            host_col[i] = host_of(url)
            blocked[i] = lists.blocked_host(host_col[i])
        text = texts[i] or ""
        if rules.check_text_urls and ("http" in text or "www." in text):
            text_urls[i] = sum(lists.blocked_host(host_of(u)) for u in _URL.findall(text))
    frac = np.divide(hits, words, out=np.zeros(n, np.float64), where=words > 0)
    return {
        "safety_word_hits": pa.array(hits, pa.int64()),
        "safety_word_frac": pa.array(frac, pa.float64()),
        "safety_first_word": pa.array(first, pa.string()),
        "safety_url_host": pa.array(host_col, pa.string()),
        "safety_blocked_domain": pa.array(blocked, pa.bool_()),
        "safety_blocked_text_urls": pa.array(text_urls, pa.int64()),
    }
