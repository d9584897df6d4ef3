"""The shards stage: every document round-trips, output is deterministic, a killed run resumes."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter
from refinery.storage.manifest import file_sha256
from refinery.storage.shard_stats import connect, tokens_by_format
from refinery.storage.shards import is_val, read_shard
from refinery.tasks.encode import ShardsConfig, close_documents, run_encode
from refinery.tasks.tokenizer import EOT, TokenizerConfig, load_tokenizer, run_train_tokenizer

WORDS = ["water", "stone", "naïve", "straße", "中文", "🙂", "if x:", "    pass", "<div>", "\n", "\r\n", "\x00"]


def write_corpus(directory: Path, n: int, seed: int = 0) -> tuple[list[Path], dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = "".join(rng.choice(WORDS) + rng.choice([" ", ""]) for _ in range(rng.randint(0, 60)))
        if i % 97 == 5:
            text += f" quoting {EOT} inside"
        rows.append({"id": f"d{i:05d}", "text": text, "source": f"raw/f{i % 5}.txt#{i}",
                     "format": ["text", "code", "html"][i % 3], "bytes": len(text), "meta": "{}"})
    writer = PartWriter(directory, schema=DOCUMENT_SCHEMA, rows_per_part=400, row_group_size=100)
    for start in range(0, n, 100):  # several row groups per part file
        writer.write(pa.Table.from_pylist(rows[start : start + 100], schema=DOCUMENT_SCHEMA))
    writer.close()
    return sorted(directory.glob("part-*.parquet")), {r["id"]: r["text"] for r in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("enc")
    files, texts = write_corpus(root / "curated", 1200)
    run_train_tokenizer(files, root / "tokenizer", TokenizerConfig(vocab_size=500), progress=False)
    return root, files, texts, root / "tokenizer" / "tokenizer.json"


CFG = ShardsConfig(shard_tokens=3000, val_fraction=0.1, batch_docs=64)


@pytest.fixture(scope="module")
def encoded(corpus):
    root, files, _, tokenizer = corpus
    return run_encode(files, tokenizer, root / "shards", CFG, progress=False), root / "shards"


def shard_digests(stage: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}


def test_every_document_decodes_to_its_curated_text(corpus, encoded) -> None:
    _, _, texts, tokenizer = corpus
    result, stage = encoded
    tok, eot_id = load_tokenizer(tokenizer)
    seen: set[str] = set()
    for split in ("train", "val"):
        for name in result.extra[f"{split}_files"]:
            ids, tokens = read_shard(stage / name)
            assert pa.ipc.open_file(pa.memory_map(str(stage / name))).schema.field("input_ids").type == pa.list_(pa.uint16())
            for doc_id, toks in zip(ids, tokens, strict=True):
                assert is_val(texts[doc_id], CFG.val_fraction) == (split == "val")
                assert toks[-1] == eot_id and eot_id not in toks[:-1]
                assert tok.decode(toks[:-1].tolist(), skip_special_tokens=False) == texts[doc_id]
                assert doc_id not in seen
                seen.add(doc_id)
    empty = {i for i, t in texts.items() if not t}
    assert seen == set(texts) - empty and empty


def test_counts_manifest_entries_and_stats(corpus, encoded) -> None:
    _, _, texts, _ = corpus
    result, stage = encoded
    result.counts.check("shards")
    assert result.counts.in_ == len(texts)
    assert result.counts.dropped == {"empty_text": sum(1 for t in texts.values() if not t)}
    assert len(result.extra["train_files"]) > 3  # small shard_tokens: several shards
    assert all(o.sha256 and o.bytes > 0 for o in result.outputs)
    stats = pq.read_table(stage / "stats.parquet")
    assert stats.column_names == ["id", "split", "format", "source", "n_tokens", "n_bytes"]
    assert stats.num_rows == result.counts.kept
    for split in ("train", "val"):
        rows = stats.filter(pa.compute.equal(stats["split"], split))
        assert pa.compute.sum(rows["n_tokens"]).as_py() == result.extra[f"{split}_tokens"]
        assert pa.compute.sum(rows["n_bytes"]).as_py() == result.extra[f"{split}_bytes"] == sum(
            len(texts[i].encode()) for i in rows["id"].to_pylist()
        )
    dropped = pq.read_table(stage / "dropped.parquet")
    assert set(dropped["reason"].to_pylist()) == {"empty_text"}
    assert not (stage / "progress").exists()
    # shards close at the first document that reaches shard_tokens
    for name in result.extra["train_files"][:-1]:
        _, tokens = read_shard(stage / name)
        total = sum(len(t) for t in tokens)
        assert total >= CFG.shard_tokens and total - len(tokens[-1]) < CFG.shard_tokens


def test_duckdb_views_over_stats(encoded) -> None:
    result, stage = encoded
    rows = tokens_by_format(stage)
    assert {(r["split"], r["format"]) for r in rows} == {(s, f) for s in ("train", "val") for f in ("text", "code", "html")}
    assert sum(r["tokens"] for r in rows) == result.extra["train_tokens"] + result.extra["val_tokens"]
    con = connect(stage)
    by_source = con.execute("SELECT source_file, sum(documents) FROM tokens_by_source GROUP BY 1 ORDER BY 1").fetchall()
    assert [s for s, _ in by_source] == [f"raw/f{i}.txt" for i in range(5)]
    (split_docs,) = con.execute("SELECT sum(documents) FROM tokens_by_split").fetchone()
    assert split_docs == result.counts.kept


def test_same_input_twice_gives_byte_identical_shards(corpus, encoded, tmp_path: Path) -> None:
    root, files, _, tokenizer = corpus
    run_encode(files, tokenizer, tmp_path / "again", CFG, progress=False)
    assert shard_digests(tmp_path / "again") == shard_digests(encoded[1])


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_an_executor_gives_identical_shards(corpus, encoded, tmp_path: Path, kind: str) -> None:
    _, files, _, tokenizer = corpus
    if kind == "threads":
        with cf.ThreadPoolExecutor(2) as pool:
            run_encode(files, tokenizer, tmp_path / kind, CFG, progress=False, executor=pool)
    else:  # the stage's own pool of worker processes
        run_encode(files, tokenizer, tmp_path / kind, CFG.model_copy(update={"workers": 2}), progress=False)
    assert shard_digests(tmp_path / kind) == shard_digests(encoded[1])


CHILD = textwrap.dedent(
    """
    import concurrent.futures as cf, sys, time
    from pathlib import Path
    from refinery.tasks.encode import ShardsConfig, close_documents, run_encode

    class Slow(cf.ThreadPoolExecutor):
        # A real executor whose tasks take a while, so the parent can kill the run part-way.
        def submit(self, fn, *args):
            return super().submit(lambda *a: (time.sleep(0.15), fn(*a))[1], *args)

    stage, tokenizer, cfg_json, *files = sys.argv[1:]
    with Slow(1) as pool:
        run_encode([Path(p) for p in files], Path(tokenizer), Path(stage),
                   ShardsConfig.model_validate_json(cfg_json), progress=False, executor=pool)
    """
)


def test_killed_run_resumes_to_the_same_shards(corpus, encoded, tmp_path: Path) -> None:
    _, files, _, tokenizer = corpus
    stage = tmp_path / "shards"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(stage), str(tokenizer), CFG.model_dump_json(), *map(str, files)],
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    deadline = time.monotonic() + 60
    while not list(stage.glob("train-00002.arrow")):
        assert proc.poll() is None, "the child finished or failed before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage / "stats.parquet").exists(), "killed too late to test resuming"
    for shard in stage.glob("*.arrow"):  # whatever is visible is complete
        read_shard(shard)
    assert (stage / "progress" / "state.json").is_file()
    first = (stage / "train-00000.arrow").stat()
    result = run_encode(files, tokenizer, stage, CFG, progress=False)
    kept = (stage / "train-00000.arrow").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "completed shards are kept"
    assert shard_digests(stage) == shard_digests(encoded[1])
    # The manifest describes the adopted shards as well as those this run wrote.
    assert {o.path: o.sha256 for o in result.outputs} == shard_digests(stage)
    assert [o.model_dump() for o in result.outputs] == [o.model_dump() for o in encoded[0].outputs]


def test_resume_ignores_progress_of_a_different_config(corpus, encoded, tmp_path: Path) -> None:
    _, files, _, tokenizer = corpus
    stage = tmp_path / "shards"
    run_encode(files, tokenizer, stage, CFG.model_copy(update={"shard_tokens": 1000}), progress=False)
    run_encode(files, tokenizer, stage, CFG, progress=False)
    assert shard_digests(stage) == shard_digests(encoded[1])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_close_documents_appends_the_end_of_text_id_to_each_document(dtype: type) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 30, size=500)
    lengths[[0, 7, 499]] = 0  # documents without tokens still get their end-of-text id
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(1, 65535, size=int(offsets[-1])).astype(np.uint32)
    out, lens = close_documents(values, offsets, 0, dtype)
    expected = np.concatenate([np.append(values[offsets[i] : offsets[i + 1]], 0) for i in range(len(lengths))])
    assert out.dtype == dtype and np.array_equal(out, expected) and np.array_equal(lens, lengths + 1)
    out, lens = close_documents(np.zeros(0, np.uint32), np.zeros(1, np.int64), 5, dtype)
    assert len(out) == 0 and len(lens) == 0


def test_bad_config_names_the_key() -> None:
    for key, value in [("val_fraction", 1.5), ("shard_tokens", 0), ("workers", 0), ("shard_size", 3)]:
        with pytest.raises(ValidationError, match=key):
            ShardsConfig(**{key: value})


def test_missing_tokenizer_says_what_to_do(corpus, tmp_path: Path) -> None:
    _, files, _, _ = corpus
    with pytest.raises(FileNotFoundError, match="tokenizer stage"):
        run_encode(files, tmp_path / "nope.json", tmp_path / "shards", CFG, progress=False)


@pytest.mark.parametrize("in_flight", [None, 1, 3])
def test_map_in_order_keeps_order_and_bounds_pending_items(in_flight: int | None) -> None:
    import threading

    from refinery.tasks.parallel import PER_WORKER, map_in_order

    drawn = 0

    def items():
        nonlocal drawn
        for i in range(40):
            drawn += 1
            yield (i,)

    def slow_square(i: int) -> int:  # later items often finish first
        time.sleep(random.Random(i).random() / 500)
        return i * i

    bound = in_flight or PER_WORKER * 4
    with cf.ThreadPoolExecutor(4) as pool:
        results = []
        for n, value in enumerate(map_in_order(slow_square, items(), pool, in_flight)):
            assert drawn - n <= bound  # submitted and not yet consumed, this one included
            results.append(value)
    assert results == [i * i for i in range(40)]
    threads = set()
    in_process = list(map_in_order(lambda i: threads.add(threading.get_ident()) or i, items(), None))
    assert in_process == list(range(40)) and threads == {threading.get_ident()}
