"""Token shards (Arrow IPC, uncompressed) and the memory-mapped window loader.

A shard holds one row per document: `id` and `input_ids`, the latter as
`list<uint16>` when the vocabulary fits in 16 bits, else `list<uint32>`, each
document closed by the end-of-text token. Shards are uncompressed so that the
loader can memory-map them and serve random windows of `seq_len + 1` tokens
straight from the flattened values, without copying a shard into memory.

The train/val split is a pure function of the document's text (`is_val`), so it
is the same in every run, for every stage that asks, and wherever the corpus
lives: moving or renaming the source folder changes the ids, not the split.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.storage.atomic import atomic_path

SHARD_SUFFIX = ".arrow"


def token_dtype(vocab_size: int) -> pa.DataType:
    """`uint16` when every token id fits in 16 bits, else `uint32`."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_schema(vocab_size: int) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string()), pa.field("input_ids", pa.list_(token_dtype(vocab_size)))])


def split_fraction(key: str, salt: str = "split") -> float:
    """A uniform number in [0, 1) fixed by `key` (and a salt naming its use)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split.

    Keyed by the text, not the id: ids hash the source path, so a corpus copied
    to another folder would otherwise be split (and trained) differently.
    Exact duplicates are gone by the time the split is asked for.
    """
    return split_fraction(text) < val_fraction


def split_fractions(texts: pa.Array | pa.ChunkedArray, salt: str = "split") -> np.ndarray:
    """`split_fraction` of every string of an Arrow (large) string column, as float64; a null counts as "".

    The UTF-8 bytes are hashed where Arrow holds them, with no Python string per
    document, which is how the shards stage splits a whole row group at once.
    The result equals `split_fraction` bit for bit: the same digest, read as a
    big-endian uint64 and scaled by 2**-64 (uint64 -> float64 rounds to nearest
    in both, and the scaling is exact).
    """
    person = salt.encode()[:16]
    blake2b = hashlib.blake2b
    digests = bytearray()
    for chunk in texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]:
        if len(chunk) == 0:
            continue
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            raise TypeError(f"split_fractions needs a string column, got {chunk.type}")
        _, offsets_buffer, data_buffer = chunk.buffers()
        offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        starts, ends = offsets[:-1].copy(), offsets[1:].copy()
        if chunk.null_count:  # a null slot's bytes are unspecified: hash it as the empty string
            null = chunk.is_null().to_numpy(zero_copy_only=False)
            ends[null] = starts[null]
        data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            digests += blake2b(data[start:end], digest_size=8, person=person).digest()
    return np.frombuffer(bytes(digests), dtype=">u8").astype(np.float64) / 2.0**64


def token_shard_bytes(
    ids: Sequence[str] | pa.Array, values: np.ndarray, offsets: np.ndarray, vocab_size: int, name: str = "shard"
) -> pa.Buffer:
    """The bytes of a shard file, built in memory from flat token `values` and `len(ids) + 1` row `offsets`.

    The tokens are already one array and the ids may be an Arrow array, so
    nothing is converted per document (the IPC bytes are the same either way).
    """
    schema = shard_schema(vocab_size)
    np_dtype = np.uint16 if schema.field("input_ids").type.value_type == pa.uint16() else np.uint32
    offsets = np.asarray(offsets, dtype=np.int32)
    if len(offsets) != len(ids) + 1 or offsets[0] != 0 or offsets[-1] != len(values):
        raise ValueError(f"{name}: offsets must run from 0 to len(values) with one entry per document plus one")
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, dtype=np_dtype)))
    id_array = ids.cast(pa.string()) if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
    table = pa.table({"id": id_array, "input_ids": input_ids}, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def write_shard_bytes(path: str | os.PathLike[str], data: pa.Buffer) -> str:
    """Write a shard's bytes atomically; returns their sha256, taken from memory (the file is not read back).

    The hash runs on a thread of its own while the bytes are written and synced: both release the GIL.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="shard-sha256") as hasher:
        digest = hasher.submit(lambda: hashlib.sha256(memoryview(data)).hexdigest())
        with atomic_path(path) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink:
                sink.write(data)
        return digest.result()


def write_token_shard_arrays(
    path: str | os.PathLike[str],
    ids: Sequence[str] | pa.Array,
    values: np.ndarray,
    offsets: np.ndarray,
    vocab_size: int,
) -> int:
    """Write one shard atomically from flat token `values` and `len(ids) + 1` row `offsets`.

    This is the fast path the shards stage uses (`token_shard_bytes`, then
    `write_shard_bytes`). Returns the number of tokens.
    """
    write_shard_bytes(path, token_shard_bytes(ids, values, offsets, vocab_size, name=str(path)))
    return len(values)


def write_token_shard(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    token_lists: Sequence[np.ndarray],
    vocab_size: int,
) -> int:
    """Write one shard atomically from one token array per document; returns the number of tokens."""
    dtype = np.uint16 if token_dtype(vocab_size) == pa.uint16() else np.uint32
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(t, dtype=dtype) for t in token_lists]) if token_lists else np.array([], dtype)
    return write_token_shard_arrays(path, ids, values, offsets, vocab_size)


def _open_shard(path: str | os.PathLike[str]) -> pa.Table:
    """The shard as a table whose buffers live in the memory map (no read into memory)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _flat_values(table: pa.Table) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values, row offsets) per chunk of `input_ids`, both zero-copy views of the map."""
    out = []
    for chunk in table.column("input_ids").chunks:
        offsets = chunk.offsets.to_numpy(zero_copy_only=True)
        if len(chunk) == 0 or offsets[-1] == offsets[0]:
            continue
        values = chunk.values.to_numpy(zero_copy_only=True)[offsets[0] : offsets[-1]]
        out.append((values, offsets - offsets[0]))
    return out


def map_tokens(paths: Sequence[str | os.PathLike[str]]) -> list[np.ndarray]:
    """Memory-map each shard and return its flattened token values (zero-copy views)."""
    return [values for path in paths for values, _ in _flat_values(_open_shard(path))]


def read_shard(path: str | os.PathLike[str]) -> tuple[list[str], list[np.ndarray]]:
    """Document ids and their token arrays (views into the map), for inspection and tests."""
    table = _open_shard(path)
    ids = table.column("id").to_pylist()
    tokens: list[np.ndarray] = []
    for chunk in table.column("input_ids").chunks:
        offsets = chunk.offsets.to_numpy(zero_copy_only=True)
        values = chunk.values.to_numpy(zero_copy_only=True)
        tokens.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return ids, tokens


class TokenWindows:
    """Random windows of `seq_len + 1` tokens over memory-mapped shards.

    The shards are read as one logical stream of tokens (their flattened values,
    in the order given) without concatenating them: a window is gathered from
    the shard that holds it, and only the rare window that straddles two
    shards is assembled piecewise.

    The windows of a step are a pure function of (seed, step): the starts of
    all ranks are drawn together without replacement and rank `r` takes its
    slice, so batches are reproducible, a resumed run sees exactly the batches
    it would have seen, and two ranks never get the same window at one step.
    With `respect_documents=True` windows start at document starts only.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        respect_documents: bool = False,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.paths = [Path(p) for p in paths]
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.respect_documents = respect_documents
        self.step = 0
        self._tables = [_open_shard(p) for p in self.paths]  # keep the maps alive
        parts = [part for table in self._tables for part in _flat_values(table)]
        self._parts = [values for values, _ in parts]
        sizes = np.array([len(v) for v in self._parts], dtype=np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._window = seq_len + 1
        if self.num_tokens < self._window:
            raise ValueError(
                f"only {self.num_tokens} tokens in {len(self.paths)} shard(s), fewer than one window of "
                f"{self._window}; lower seq_len or add data"
            )
        self._doc_starts: np.ndarray | None = None
        if respect_documents:
            starts = np.concatenate([offsets[:-1] + base for (_, offsets), base in zip(parts, self._bounds[:-1], strict=True)])
            self._doc_starts = starts[starts <= self.num_tokens - self._window].astype(np.int64)
            if len(self._doc_starts) == 0:
                raise ValueError(f"no document leaves room for a window of {self._window} tokens; lower seq_len")

    @property
    def num_tokens(self) -> int:
        return int(self._bounds[-1])

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one array: a view for a single shard, a copy (avoid) for several."""
        if len(self._parts) == 1:
            return self._parts[0]
        return np.concatenate(self._parts) if self._parts else np.array([], np.uint16)

    def _starts(self, step: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        if self.respect_documents:
            population = len(self._doc_starts)
        else:
            population = self.num_tokens - self._window + 1
        replace = population < count  # too few distinct windows: repeats cannot be avoided
        picks = rng.choice(population, size=count, replace=replace)
        return self._doc_starts[picks] if self.respect_documents else picks.astype(np.int64)

    def _gather(self, starts: np.ndarray) -> np.ndarray:
        """Windows at global token positions `starts`, as an int64 `(len(starts), seq_len + 1)` array."""
        out = np.empty((len(starts), self._window), dtype=np.int64)
        part = np.searchsorted(self._bounds, starts, side="right") - 1
        local = starts - self._bounds[part]
        inside = local + self._window <= self._bounds[part + 1] - self._bounds[part]
        for p in np.unique(part[inside]):
            rows = np.flatnonzero(inside & (part == p))
            view = np.lib.stride_tricks.sliding_window_view(self._parts[p], self._window)
            out[rows] = view[local[rows]]
        for row in np.flatnonzero(~inside):  # straddles shards: rare, assemble piece by piece
            pos, filled, p = int(local[row]), 0, int(part[row])
            while filled < self._window:
                piece = self._parts[p][pos : pos + self._window - filled]
                out[row, filled : filled + len(piece)] = piece
                filled += len(piece)
                p, pos = p + 1, 0
        return out

    def get_batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each `(batch_size, seq_len)` int64, for this rank at a given step."""
        starts = self._starts(step, batch_size * self.world_size)
        window = self._gather(starts[self.rank * batch_size : (self.rank + 1) * batch_size])
        return window[:, :-1], window[:, 1:]

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.get_batch(self.step, batch_size)
        self.step += 1
        return batch

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive non-overlapping windows over all tokens, in order, for validation."""
        n = (self.num_tokens - 1) // self.seq_len
        starts = np.arange(n, dtype=np.int64) * self.seq_len
        for i, b in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            window = self._gather(starts[b : b + batch_size])
            yield window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and bools only, so a checkpoint loads with `torch.load(weights_only=True)`."""
        return {
            "seed": self.seed,
            "step": self.step,
            "seq_len": self.seq_len,
            "num_tokens": self.num_tokens,
            "respect_documents": self.respect_documents,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seq_len"]) != self.seq_len:
            raise ValueError(f"checkpoint seq_len {state['seq_len']} != loader seq_len {self.seq_len}")
        if "num_tokens" in state and int(state["num_tokens"]) != self.num_tokens:
            raise ValueError(
                f"checkpoint was taken over {state['num_tokens']} tokens but these shards hold {self.num_tokens}; "
                "resume with the same shards the run started with"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self.respect_documents = bool(state.get("respect_documents", self.respect_documents))
        if self.respect_documents and self._doc_starts is None:
            raise ValueError("checkpoint samples at document starts; build the loader with respect_documents=True")
