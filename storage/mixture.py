"""A data mixture for the training loader, and the provenance of the tokens the model actually saw.

Token shards hold one row per document (`id`, `input_ids`); the shards stage's
`stats.parquet` beside them says each document's `format` and `source`. Joined
by id, they give every document of the flattened token stream a format and a
source file, which is all a mixture and its accounting need: the shards'
on-disk format is unchanged.

`train.mixture` maps glob patterns to sampling weights, e.g. `{code: 1, "*": 3}`.
A pattern matches a document's format or its source file (the raw file's URI,
without the `#n` record suffix); a document belongs to the first pattern that
matches it, in the order given. The weights are the patterns' shares of the
windows drawn (normalised to sum to one); within a pattern, documents are drawn
in their natural proportions (every token equally likely). Each pattern's
documents are read as a stream of their own, so a window never runs into a
document of another pattern: a pattern of weight 0, or a document no pattern
matches, is never seen. An empty mixture keeps the loader's natural proportions
(every window start in the corpus equally likely), exactly `TokenWindows`.

Either way the loader counts the input tokens of every window it serves, by
format, by source file and by mixture pattern (all ranks' windows, so every
rank holds the totals), and keeps the counts in its state across a resume.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refinery.storage.atomic import atomic_write_json
from refinery.storage.shard_stats import STATS_FILE
from refinery.storage.shards import TokenWindows

TOKENS_SEEN_FILE = "tokens_seen_by_format.json"
UNKNOWN = "unknown"  # the format and source of a document that stats.parquet does not list


@dataclass
class DocumentTable:
    """Every document of a token stream, in stream order: where it starts, how long, its format and source."""

    starts: np.ndarray  # int64 global token position
    lengths: np.ndarray  # int64 tokens, end-of-text included
    format_codes: np.ndarray  # int64 index into `formats`
    formats: list[str]
    source_codes: np.ndarray  # int64 index into `sources`
    sources: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1] + self.lengths[-1]) if len(self.starts) else 0

    def tokens_by_format(self) -> dict[str, int]:
        """The stream's own (natural) tokens per format."""
        counts = np.bincount(self.format_codes, weights=self.lengths, minlength=len(self.formats))
        return {f: int(c) for f, c in zip(self.formats, counts, strict=True)}


def _codes(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    encoded = pc.dictionary_encode(values).combine_chunks() if isinstance(values, pa.ChunkedArray) else (
        pc.dictionary_encode(values))
    indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return indices, [str(v) for v in encoded.dictionary.to_pylist()]


def document_table(paths: Sequence[str | os.PathLike[str]], stats_file: str | os.PathLike[str] | None = None) -> DocumentTable:
    """The documents of shards `paths` (in that order, as `TokenWindows` reads them), with their formats and sources.

    `stats_file` defaults to the shards stage's `stats.parquet` beside the first shard; documents
    it does not list (or every document, when there is none) have format and source `unknown`.
    """
    ids, lengths = [], []
    for path in paths:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        ids.append(table.column("id").combine_chunks() if table.num_rows else pa.array([], pa.string()))
        lengths.append(pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False))
    doc_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    length = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(length) else length
    stats_path = Path(stats_file) if stats_file is not None else (Path(paths[0]).parent / STATS_FILE if paths else None)
    formats = pa.array([UNKNOWN] * len(length), pa.string())
    sources = formats
    if stats_path is not None and stats_path.is_file():
        stats = pq.read_table(stats_path, columns=["id", "format", "source"])
        at = pc.index_in(doc_ids, value_set=stats.column("id").combine_chunks())
        found = pc.is_valid(at)
        formats = pc.if_else(found, stats.column("format").combine_chunks().take(at), UNKNOWN)
        files = pc.replace_substring_regex(stats.column("source").combine_chunks(), r"#[0-9]+$", "")
        sources = pc.if_else(found, files.take(at), UNKNOWN)
    format_codes, format_names = _codes(pc.fill_null(formats, UNKNOWN))
    source_codes, source_names = _codes(pc.fill_null(sources, UNKNOWN))
    keep = length > 0  # documents without tokens take no place in the stream
    return DocumentTable(starts[keep], length[keep], format_codes[keep], format_names, source_codes[keep], source_names)


def assign_patterns(docs: DocumentTable, mixture: Mapping[str, float]) -> np.ndarray:
    """Per document, the index of the first pattern (in `mixture`'s order) matching its format or source; -1 if none."""
    patterns = list(mixture)

    def first_match(names: list[str]) -> np.ndarray:
        out = np.full(len(names), len(patterns), dtype=np.int64)
        for i, name in enumerate(names):
            out[i] = next((k for k, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)), len(patterns))
        return out

    by_format = first_match(docs.formats)[docs.format_codes]
    by_source = first_match(docs.sources)[docs.source_codes]
    group = np.minimum(by_format, by_source)
    return np.where(group == len(patterns), -1, group)


class MixtureWindows(TokenWindows):
    """`TokenWindows` that draws windows by a mixture of formats and sources and counts the tokens it serves.

    With an empty `mixture` the windows are exactly `TokenWindows`' (natural proportions).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mixture: Mapping[str, float] | None = None,
        stats_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(paths, seq_len, seed=seed, rank=rank, world_size=world_size)
        self.mixture = {str(k): float(v) for k, v in (mixture or {}).items()}
        self.docs = document_table(self.paths, stats_file)
        if self.docs.num_tokens != self.num_tokens:
            raise ValueError(f"the shards' documents hold {self.docs.num_tokens} tokens, their stream {self.num_tokens}")
        self._maps = [pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all() for p in self.paths]
        self._values = [c.values.to_numpy(zero_copy_only=True)[c.offsets[0].as_py(): c.offsets[-1].as_py()]
                        for t in self._maps for c in t.column("input_ids").chunks if len(c)]  # fmt: skip
        self._value_bounds = np.concatenate([[0], np.cumsum([len(v) for v in self._values])]).astype(np.int64)
        self.groups = assign_patterns(self.docs, self.mixture) if self.mixture else np.zeros(len(self.docs.starts), np.int64)
        self._shares = np.zeros(0)
        self._group_docs: list[np.ndarray] = []
        self._group_cum: list[np.ndarray] = []
        if self.mixture:
            self._plan_mixture()
        self.seen_format = np.zeros(len(self.docs.formats), np.int64)
        self.seen_source = np.zeros(len(self.docs.sources), np.int64)
        self.seen_group = np.zeros(max(1, len(self.mixture)), np.int64)
        self.counted_from_step = 0

    def _plan_mixture(self) -> None:
        weights = np.array(list(self.mixture.values()), dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"train.mixture weights must be >= 0 with at least one > 0, got {self.mixture}")
        for k, pattern in enumerate(self.mixture):
            members = np.flatnonzero(self.groups == k)
            total = int(self.docs.lengths[members].sum())
            if weights[k] > 0 and total < self._window:
                known = sorted(set(self.docs.formats)) + sorted(set(self.docs.sources))[:5]
                raise ValueError(
                    f"train.mixture pattern {pattern!r} (weight {weights[k]:g}) matches {total} training tokens, "
                    f"fewer than one window of {self._window}; patterns match a format or a source file, e.g. "
                    f"{', '.join(known)}"
                )
            self._group_docs.append(members)
            self._group_cum.append(np.concatenate([[0], np.cumsum(self.docs.lengths[members])]).astype(np.int64))
        self._shares = weights / weights.sum()

    # -- drawing ---------------------------------------------------------------------------------------

    def _positions(self, step: int, count: int) -> np.ndarray:
        """Global token positions `(count, seq_len + 1)` of a step's windows, all ranks' together."""
        rng = np.random.default_rng([self.seed, step])
        groups = rng.choice(len(self._shares), size=count, p=self._shares)
        out = np.empty((count, self._window), dtype=np.int64)
        offsets = np.arange(self._window, dtype=np.int64)
        for k in np.unique(groups):
            rows = np.flatnonzero(groups == k)
            cum, members = self._group_cum[k], self._group_docs[k]
            q = (rng.integers(0, cum[-1], size=len(rows))[:, None] + offsets) % cum[-1]  # the group's own stream
            j = np.searchsorted(cum, q, side="right") - 1
            out[rows] = self.docs.starts[members[j]] + (q - cum[j])
        return out

    def _take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at arbitrary global positions, as int64 of the same shape."""
        flat = positions.reshape(-1)
        out = np.empty(flat.shape, dtype=np.int64)
        part = np.searchsorted(self._value_bounds, flat, side="right") - 1
        for p in np.unique(part):
            rows = np.flatnonzero(part == p)
            out[rows] = self._values[p][flat[rows] - self._value_bounds[p]]
        return out.reshape(positions.shape)

    def get_batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        count = batch_size * self.world_size
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        if not self.mixture:
            starts = self._starts(step, count)
            self._count_runs(starts)
            return super().get_batch(step, batch_size)
        positions = self._positions(step, count)
        self._count_positions(positions[:, :-1])
        window = self._take(positions[mine])
        return window[:, :-1], window[:, 1:]

    # -- counting --------------------------------------------------------------------------------------

    def _add(self, docs: np.ndarray, tokens: np.ndarray) -> None:
        self.seen_format += np.bincount(self.docs.format_codes[docs], weights=tokens,
                                        minlength=len(self.seen_format)).astype(np.int64)  # fmt: skip
        self.seen_source += np.bincount(self.docs.source_codes[docs], weights=tokens,
                                        minlength=len(self.seen_source)).astype(np.int64)  # fmt: skip
        groups = self.groups[docs]
        inside = groups >= 0
        self.seen_group += np.bincount(groups[inside], weights=tokens[inside],
                                       minlength=len(self.seen_group)).astype(np.int64)  # fmt: skip

    def _doc_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.docs.starts, positions, side="right") - 1

    def _count_runs(self, starts: np.ndarray) -> None:
        """Count the input tokens of contiguous windows at `starts`: one lookup per window inside one document."""
        first, last = self._doc_of(starts), self._doc_of(starts + self.seq_len - 1)
        single = first == last
        self._add(first[single], np.full(int(single.sum()), self.seq_len, np.int64))
        if not single.all():
            spans = starts[~single][:, None] + np.arange(self.seq_len, dtype=np.int64)
            self._count_positions(spans)

    def _count_positions(self, positions: np.ndarray) -> None:
        docs, tokens = np.unique(self._doc_of(positions.reshape(-1)), return_counts=True)
        self._add(docs, tokens.astype(np.int64))

    def tokens_seen(self) -> dict[str, Any]:
        """The input tokens served so far: by format, by source file and (with a mixture) by pattern."""
        report: dict[str, Any] = {
            "total": int(self.seen_format.sum()),
            "by_format": _named(self.docs.formats, self.seen_format),
            "by_source": _named(self.docs.sources, self.seen_source),
            "available_by_format": self.docs.tokens_by_format(),
            "mixture": dict(self.mixture),
            "counted_from_step": self.counted_from_step,
        }
        if self.mixture:
            report["by_pattern"] = {p: int(c) for p, c in zip(self.mixture, self.seen_group, strict=False)}
        return report

    # -- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader's state plus the mixture and the counts: str, int and float only (`weights_only` loads it)."""
        return {
            **super().state_dict(),
            "mixture": dict(self.mixture),
            "seen_format": _named(self.docs.formats, self.seen_format, keep_zero=True),
            "seen_source": _named(self.docs.sources, self.seen_source, keep_zero=True),
            "seen_group": [int(c) for c in self.seen_group],
            "counted_from_step": self.counted_from_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mixture" in state and dict(state["mixture"]) != self.mixture:
            raise ValueError(f"checkpoint was drawn with mixture {state['mixture']}, this loader with {self.mixture}")
        super().load_state_dict(state)
        if "seen_format" not in state:  # a checkpoint of a plain TokenWindows: count from here on
            self.counted_from_step = self.step
            return
        self.seen_format = _unnamed(self.docs.formats, state["seen_format"])
        self.seen_source = _unnamed(self.docs.sources, state["seen_source"])
        self.seen_group = np.array(state["seen_group"], dtype=np.int64)
        self.counted_from_step = int(state.get("counted_from_step", 0))


def _named(names: list[str], counts: np.ndarray, keep_zero: bool = False) -> dict[str, int]:
    pairs = sorted(zip(names, counts.tolist(), strict=True), key=lambda kv: (-kv[1], kv[0]))
    return {name: int(c) for name, c in pairs if c or keep_zero}


def _unnamed(names: list[str], counts: Mapping[str, int]) -> np.ndarray:
    return np.array([int(counts.get(name, 0)) for name in names], dtype=np.int64)


def write_tokens_seen(out_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write `tokens_seen_by_format.json` into `out_dir` (atomically)."""
    path = Path(out_dir) / TOKENS_SEEN_FILE
    atomic_write_json(path, dict(report))
    return path


def read_tokens_seen(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(out_dir) / TOKENS_SEEN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
