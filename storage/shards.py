"""Token shards (Arrow IPC, uncompressed) and the memory-mapped window loader.

A shard holds one row per document: `input_ids` as `list<uint16>` when the
vocabulary fits in 16 bits, else `list<uint32>`, each document closed by the
end-of-text token. The loader maps the files and serves random windows of
`seq_len + 1` tokens from the flattened values without copying the shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.storage.atomic import atomic_path


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_schema(vocab_size: int) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string()), pa.field("input_ids", pa.list_(token_dtype(vocab_size)))])


def write_token_shard(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    token_lists: Sequence[np.ndarray],
    vocab_size: int,
) -> int:
    """Write one shard atomically; returns the number of tokens in it."""
    schema = shard_schema(vocab_size)
    np_dtype = np.uint16 if schema.field("input_ids").type.value_type == pa.uint16() else np.uint32
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(t, dtype=np_dtype) for t in token_lists]) if token_lists else np.array([], np_dtype)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    table = pa.table({"id": pa.array(list(ids), pa.string()), "input_ids": input_ids}, schema=schema)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
    return int(lengths.sum())


def map_tokens(paths: Sequence[str | os.PathLike[str]]) -> list[np.ndarray]:
    """Memory-map each shard and return its flattened token values (zero-copy views)."""
    out: list[np.ndarray] = []
    for path in paths:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        column = table.column("input_ids")
        for chunk in column.chunks:
            values = chunk.flatten()
            if len(values):
                out.append(values.to_numpy(zero_copy_only=True))
    return out


class TokenWindows:
    """Random windows of `seq_len + 1` tokens over memory-mapped shards.

    The window starts for a step are a pure function of (seed, step, rank), so
    batches are reproducible and a resumed run sees exactly the batches it
    would have seen. Ranks draw disjoint windows at each step.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        parts = map_tokens(self.paths)
        self.tokens = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else np.array([], np.uint16))
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"only {len(self.tokens)} tokens in {len(self.paths)} shard(s), fewer than one window of "
                f"{seq_len + 1}; lower seq_len or add data"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def get_batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each `(batch_size, seq_len)` int64, for a given step."""
        rng = np.random.default_rng([self.seed, step])
        high = len(self.tokens) - self.seq_len - 1
        starts = rng.integers(0, high + 1, size=batch_size * self.world_size)
        starts = starts[self.rank * batch_size : (self.rank + 1) * batch_size]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        window = self.tokens[idx].astype(np.int64)
        return window[:, :-1], window[:, 1:]

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.get_batch(self.step, batch_size)
        self.step += 1
        return batch

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive non-overlapping windows over all tokens, for validation."""
        n = (len(self.tokens) - 1) // self.seq_len
        starts = np.arange(n) * self.seq_len
        for i, b in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            s = starts[b : b + batch_size]
            idx = s[:, None] + np.arange(self.seq_len + 1)[None, :]
            window = self.tokens[idx].astype(np.int64)
            yield window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"checkpoint seq_len {state['seq_len']} != loader seq_len {self.seq_len}")
        self.seed = int(state["seed"])
        self.step = int(state["step"])
