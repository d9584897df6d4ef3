"""The token shard format and the memory-mapped window loader."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from refinery.storage.manifest import file_sha256
from refinery.storage.shards import (
    TokenWindows,
    is_val,
    map_tokens,
    read_shard,
    shard_schema,
    split_fraction,
    split_fractions,
    token_shard_bytes,
    write_shard_bytes,
    write_token_shard,
    write_token_shard_arrays,
)


def make_shards(directory: Path, sizes: list[list[int]], vocab: int = 1000, seed: int = 0) -> list[Path]:
    """Shards of random documents; `sizes[k]` lists the document lengths of shard k."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, lengths in enumerate(sizes):
        docs = [rng.integers(1, vocab, size=n).astype(np.uint16) for n in lengths]
        for d in docs:
            d[-1] = 0  # end of text
        path = directory / f"train-{k:05d}.arrow"
        write_token_shard(path, [f"s{k}d{i}" for i in range(len(docs))], docs, vocab)
        paths.append(path)
    return paths


def reference(paths: list[Path]) -> np.ndarray:
    return np.concatenate(map_tokens(paths))


def test_shard_round_trip_and_dtype(tmp_path: Path) -> None:
    docs = [np.array([5, 6, 0]), np.array([0]), np.array([70000, 1, 0])]
    n = write_token_shard(tmp_path / "a.arrow", ["x", "y", "z"], docs, vocab_size=70001)
    assert n == 7
    ids, tokens = read_shard(tmp_path / "a.arrow")
    assert ids == ["x", "y", "z"] and [t.tolist() for t in tokens] == [d.tolist() for d in docs]
    schema = pa.ipc.open_file(pa.memory_map(str(tmp_path / "a.arrow"))).schema
    assert schema.field("input_ids").type == pa.list_(pa.uint32())
    write_token_shard(tmp_path / "b.arrow", ["x"], [np.array([1, 2])], vocab_size=8192)
    assert pa.ipc.open_file(pa.memory_map(str(tmp_path / "b.arrow"))).schema.field("input_ids").type == pa.list_(pa.uint16())
    with pytest.raises(ValueError, match="offsets"):
        write_token_shard_arrays(tmp_path / "c.arrow", ["x"], np.array([1, 2], np.uint16), np.array([0, 1]), 100)
    assert not list(tmp_path.glob(".tmp-*"))


def test_loader_does_not_copy_the_shard(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [[100, 50, 300]])
    tw = TokenWindows(paths, seq_len=16)
    (values,) = tw._parts
    assert not values.flags.owndata and not values.flags.writeable  # a view into the memory map
    assert tw.tokens is values
    x, y = tw.get_batch(0, 4)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_windows_match_the_flattened_stream_across_shards(tmp_path: Path) -> None:
    # several shards, some shorter than a window: windows may straddle shard boundaries
    paths = make_shards(tmp_path, [[40, 30], [5], [80, 10, 20], [12]])
    flat = reference(paths)
    tw = TokenWindows(paths, seq_len=24, seed=3)
    assert tw.num_tokens == len(flat)
    for step in range(30):
        x, y = tw.get_batch(step, 8)
        for row_x, row_y in zip(x, y, strict=True):
            starts = [s for s in range(len(flat) - 24) if np.array_equal(flat[s : s + 24], row_x)]
            assert any(np.array_equal(flat[s + 1 : s + 25], row_y) for s in starts)
    windows = list(tw.eval_batches(batch_size=3))
    got = np.concatenate([x for x, _ in windows])
    assert got.shape == ((len(flat) - 1) // 24, 24)
    assert np.array_equal(got.reshape(-1), flat[: got.size])


def test_batches_are_a_function_of_seed_and_step(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [[500, 400], [300]])
    a, b = TokenWindows(paths, 32, seed=7), TokenWindows(paths, 32, seed=7)
    assert np.array_equal(a.get_batch(5, 4)[0], b.get_batch(5, 4)[0])
    assert not np.array_equal(a.get_batch(5, 4)[0], TokenWindows(paths, 32, seed=8).get_batch(5, 4)[0])
    assert not np.array_equal(a.get_batch(5, 4)[0], a.get_batch(6, 4)[0])


def test_resumed_loader_sees_the_batches_of_an_uninterrupted_one(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [[700, 300], [400]])
    straight = TokenWindows(paths, 32, seed=11)
    expected = [straight.next_batch(6) for _ in range(10)]
    first = TokenWindows(paths, 32, seed=11)
    got = [first.next_batch(6) for _ in range(4)]
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    resumed = TokenWindows(paths, 32, seed=0)  # the seed comes from the checkpoint
    resumed.load_state_dict(state)
    got += [resumed.next_batch(6) for _ in range(6)]
    for (ex, ey), (gx, gy) in zip(expected, got, strict=True):
        assert np.array_equal(ex, gx) and np.array_equal(ey, gy)


def test_load_state_rejects_other_shards_or_seq_len(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [[500]])
    state = TokenWindows(paths, 32).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows(paths, 16).load_state_dict(state)
    (tmp_path / "other").mkdir()
    other = make_shards(tmp_path / "other", [[600]])
    with pytest.raises(ValueError, match="same shards"):
        TokenWindows(other, 32).load_state_dict(state)


def test_ranks_never_share_a_window_at_a_step(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [[60, 40]])  # few windows: collisions would show
    world = 4
    loaders = [TokenWindows(paths, 16, seed=1, rank=r, world_size=world) for r in range(world)]
    for step in range(50):
        starts = [tw._starts(step, 5 * world)[tw.rank * 5 : (tw.rank + 1) * 5] for tw in loaders]
        assert len(set(np.concatenate(starts).tolist())) == 20  # 20 distinct windows across the 4 ranks
        flat = reference(paths)
        for tw, rank_starts in zip(loaders, starts, strict=True):
            x, _ = tw.get_batch(step, 5)
            assert all(np.array_equal(flat[s : s + 16], row) for s, row in zip(rank_starts, x, strict=True))


def test_document_respecting_windows_start_at_documents(tmp_path: Path) -> None:
    lengths = [[30, 50, 20], [70, 25]]
    paths = make_shards(tmp_path, lengths)
    flat = reference(paths)
    doc_starts = set(np.concatenate([[0], np.cumsum(sum(lengths, []))])[:-1].tolist())
    tw = TokenWindows(paths, 16, seed=2, respect_documents=True)
    for step in range(20):
        starts = tw._starts(step, 3)
        assert set(starts.tolist()) <= doc_starts
        x, _ = tw.get_batch(step, 3)
        for s, row in zip(starts, x, strict=True):
            assert np.array_equal(flat[s : s + 16], row)
            assert s == 0 or flat[s - 1] == 0  # the previous token closes a document


def test_too_little_data_says_what_to_do(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [[10]])
    with pytest.raises(ValueError, match="lower seq_len"):
        TokenWindows(paths, 64)


def test_split_is_a_stable_function_of_the_text() -> None:
    ids = [f"document number {i}" for i in range(20000)]
    val = [i for i in ids if is_val(i, 0.05)]
    assert 0.04 < len(val) / len(ids) < 0.06
    assert val == [i for i in ids if is_val(i, 0.05)]
    assert set(val) <= {i for i in ids if is_val(i, 0.2)}  # a larger fraction only adds documents
    assert not any(is_val(i, 0.0) for i in ids)


def test_split_fractions_of_an_arrow_column_equal_split_fraction_bit_for_bit() -> None:
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\x00", "é", "中", "🙂", "\u202e", "<|endoftext|>"]
    texts = ["", *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3000))) for _ in range(400))]
    texts += [f"document number {i}" for i in range(2000)]
    want = np.array([split_fraction(t) for t in texts])
    for kind in (pa.string(), pa.large_string()):
        column = pa.array(texts, kind)
        assert np.array_equal(split_fractions(column), want)
        assert np.array_equal(split_fractions(column.slice(7, 300)), want[7:307])  # offset into the buffers
        chunked = pa.chunked_array([column.slice(0, 100), column.slice(100, 0), column.slice(100)])
        assert np.array_equal(split_fractions(chunked), want)
        salted = [split_fraction(t, "encoder-gate") for t in texts[:50]]
        assert split_fractions(column.slice(0, 50), "encoder-gate").tolist() == salted
    assert ((split_fractions(pa.array(texts)) < 0.05) == [is_val(t, 0.05) for t in texts]).all()
    # A null counts as "", even when its slot spans bytes (Arrow leaves those unspecified).
    offsets = pa.py_buffer(np.array([0, 3, 6, 9], np.int64).tobytes())
    validity = pa.py_buffer(bytes([0b101]))
    nulls = pa.Array.from_buffers(pa.large_string(), 3, [validity, offsets, pa.py_buffer(b"abcdefghi")], null_count=1)
    assert split_fractions(nulls).tolist() == [split_fraction("abc"), split_fraction(""), split_fraction("ghi")]
    assert len(split_fractions(pa.array([], pa.large_string()))) == 0
    with pytest.raises(TypeError, match="string column"):
        split_fractions(pa.array([1, 2]))


def test_arrow_ids_write_the_same_bytes_as_python_ids(tmp_path: Path) -> None:
    # The shards stage hands over ids taken and sliced from Parquet columns; the file must not depend on that.
    names = [f"raw/file-{i}.txt#{i}" for i in range(60)]
    taken = pa.array(["pad", *names], pa.large_string()).slice(1).take(pa.array(range(60)))
    sliced = pa.concat_arrays([pa.array(["x", *names[:20]]).slice(1), pa.array(names[20:])])
    values = np.arange(240, dtype=np.uint16)
    offsets = np.arange(0, 241, 4)
    write_token_shard_arrays(tmp_path / "list.arrow", names, values, offsets, 8192)
    for i, ids in enumerate([taken, sliced, sliced.slice(0)]):
        write_token_shard_arrays(tmp_path / f"arrow{i}.arrow", ids, values, offsets, 8192)
        assert (tmp_path / f"arrow{i}.arrow").read_bytes() == (tmp_path / "list.arrow").read_bytes()
    assert read_shard(tmp_path / "arrow0.arrow")[0] == names


def test_shard_bytes_built_in_memory_are_the_file_arrow_writes(tmp_path: Path) -> None:
    """The stage builds a shard's bytes in memory and hashes them there: the file and its checksum must be
    exactly what writing the table straight to disk gives, for both token widths."""
    ids = [f"d{i}" for i in range(50)]
    offsets = np.concatenate([[0], np.cumsum(np.arange(50) % 7)])
    for vocab, dtype in ((8192, np.uint16), (100_000, np.uint32)):
        values = np.arange(offsets[-1], dtype=np.uint32) * 3 % vocab
        direct = tmp_path / f"direct-{vocab}.arrow"
        schema = shard_schema(vocab)
        input_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(dtype)))
        table = pa.table({"id": pa.array(ids), "input_ids": input_ids}, schema=schema)
        with pa.OSFile(str(direct), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
        data = token_shard_bytes(ids, values, offsets, vocab)
        digest = write_shard_bytes(tmp_path / f"memory-{vocab}.arrow", data)
        assert (tmp_path / f"memory-{vocab}.arrow").read_bytes() == direct.read_bytes() == data.to_pybytes()
        assert digest == file_sha256(direct)
    with pytest.raises(ValueError, match="offsets"):
        token_shard_bytes(ids, values, offsets[:-1], 8192)
