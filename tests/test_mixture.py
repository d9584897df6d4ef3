"""The data mixture draws windows by format and source weights, and counts the tokens the model saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refinery.model.train import TrainConfig, train
from refinery.storage.mixture import TOKENS_SEEN_FILE, MixtureWindows, document_table
from refinery.storage.outputs import Shards
from refinery.storage.shards import TokenWindows, write_token_shard

VOCAB, SEQ, EOT = 64, 16, 63
CODE_TOKENS, TEXT_TOKENS = range(0, 30), range(30, 60)  # each format has its own token ids: a window tells its origin

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def corpus(folder: Path, docs: int = 60) -> tuple[list[Path], Path]:
    """Train shards of `code` and `text` documents (two shards, two source files each) and their stats.parquet."""
    rng = np.random.default_rng(0)
    rows, shards = [], []
    for shard in range(2):
        ids, tokens = [], []
        for i in range(docs // 2):
            fmt = "code" if rng.random() < 0.5 else "text"
            ids_range = CODE_TOKENS if fmt == "code" else TEXT_TOKENS
            n = int(rng.integers(10, 50))
            doc_id = f"s{shard}d{i}"
            ids.append(doc_id)
            tokens.append(np.append(rng.integers(ids_range.start, ids_range.stop, n), EOT).astype(np.uint16))
            source = f"file:///corpus/{fmt}/part{shard}.jsonl#{i}"
            rows.append({"id": doc_id, "split": "train", "format": fmt, "source": source, "n_tokens": n + 1,
                         "n_bytes": n})  # fmt: skip
        path = folder / f"train-{shard:05d}.arrow"
        write_token_shard(path, ids, tokens, VOCAB)
        shards.append(path)
    pq.write_table(pa.Table.from_pylist(rows), folder / "stats.parquet")
    write_token_shard(folder / "val-00000.arrow", ["v0"], [np.arange(40, dtype=np.uint16) % 60], VOCAB)
    return shards, folder / "stats.parquet"


def formats_of(x: np.ndarray) -> set[str]:
    return {"code" if t in CODE_TOKENS else "text" for t in x.reshape(-1).tolist() if t != EOT}


def test_documents_carry_their_format_and_source_file(tmp_path):
    shards, _ = corpus(tmp_path)
    docs = document_table(shards)  # stats.parquet is found beside the shards
    assert set(docs.formats) == {"code", "text"}
    assert sorted(docs.sources) == [f"file:///corpus/{f}/part{s}.jsonl" for f in ("code", "text") for s in (0, 1)]
    assert docs.num_tokens == TokenWindows(shards, SEQ).num_tokens
    assert sum(docs.tokens_by_format().values()) == docs.num_tokens


def test_no_mixture_draws_exactly_the_natural_windows_and_counts_them(tmp_path):
    shards, stats = corpus(tmp_path)
    plain, mixed = TokenWindows(shards, SEQ, seed=3), MixtureWindows(shards, SEQ, seed=3, stats_file=stats)
    for _ in range(5):
        (xa, ya), (xb, yb) = plain.next_batch(8), mixed.next_batch(8)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    seen = mixed.tokens_seen()
    assert seen["total"] == 5 * 8 * SEQ == sum(seen["by_format"].values()) == sum(seen["by_source"].values())
    assert set(seen["by_format"]) == {"code", "text"}


def test_a_zero_weight_format_is_never_seen(tmp_path):
    shards, stats = corpus(tmp_path)
    windows = MixtureWindows(shards, SEQ, seed=1, mixture={"code": 1.0, "text": 0.0}, stats_file=stats)
    for _ in range(20):
        x, y = windows.next_batch(8)
        assert formats_of(x) == {"code"} and formats_of(y) == {"code"}
    seen = windows.tokens_seen()
    assert seen["by_format"] == {"code": 20 * 8 * SEQ}
    assert seen["by_pattern"] == {"code": 20 * 8 * SEQ, "text": 0}
    assert all("/code/" in source for source in seen["by_source"])


def test_weights_set_the_shares_and_patterns_match_source_files(tmp_path):
    shards, stats = corpus(tmp_path)
    windows = MixtureWindows(shards, SEQ, seed=0, mixture={"code": 3, "text": 1}, stats_file=stats)
    for _ in range(50):
        windows.next_batch(16)
    seen = windows.tokens_seen()["by_format"]
    assert seen["code"] / (seen["code"] + seen["text"]) == pytest.approx(0.75, abs=0.05)

    by_file = MixtureWindows(shards, SEQ, mixture={"*/part1.jsonl": 1}, stats_file=stats)
    by_file.next_batch(16)
    assert set(by_file.tokens_seen()["by_source"]) <= {f"file:///corpus/{f}/part1.jsonl" for f in ("code", "text")}


def test_a_pattern_that_matches_nothing_is_an_error_naming_it(tmp_path):
    shards, stats = corpus(tmp_path)
    with pytest.raises(ValueError, match="'cod'"):
        MixtureWindows(shards, SEQ, mixture={"cod": 1}, stats_file=stats)
    with pytest.raises(ValueError, match="mixture"):
        TrainConfig(mixture={"code": 0})


def test_counts_and_draws_survive_a_resume(tmp_path):
    shards, stats = corpus(tmp_path)
    mixture = {"code": 1, "text": 2}
    straight = MixtureWindows(shards, SEQ, seed=2, mixture=mixture, stats_file=stats)
    resumed = MixtureWindows(shards, SEQ, seed=2, mixture=mixture, stats_file=stats)
    for _ in range(3):
        straight.next_batch(4)
        resumed.next_batch(4)
    path = tmp_path / "state.pt"
    torch.save(resumed.state_dict(), path)
    resumed = MixtureWindows(shards, SEQ, seed=2, mixture=mixture, stats_file=stats)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for _ in range(3):
        np.testing.assert_array_equal(straight.next_batch(4)[0], resumed.next_batch(4)[0])
    assert resumed.tokens_seen() == straight.tokens_seen()
    with pytest.raises(ValueError, match="mixture"):
        MixtureWindows(shards, SEQ, seed=2, stats_file=stats).load_state_dict(straight.state_dict())


def test_ranks_split_one_draw_and_each_counts_all_of_it(tmp_path):
    shards, stats = corpus(tmp_path)
    mixture = {"text": 1}
    ranks = [MixtureWindows(shards, SEQ, rank=r, world_size=2, mixture=mixture, stats_file=stats) for r in (0, 1)]
    x0, x1 = (w.next_batch(4)[0] for w in ranks)
    assert not np.array_equal(x0, x1) and formats_of(np.stack([x0, x1])) == {"text"}
    assert ranks[0].tokens_seen() == ranks[1].tokens_seen()
    assert ranks[0].tokens_seen()["total"] == 2 * 4 * SEQ


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{
        "preset": "test", "seq_len": SEQ, "micro_batch_size": 4, "tokens_per_step": 4 * SEQ, "max_steps": 4,
        "warmup_steps": 1, "eval_every": 4, "eval_batches": 1, "precision": "fp32", "device": "cpu",
        "max_time_s": None, **overrides,
    })  # fmt: skip


def test_training_records_the_tokens_it_saw_by_format(tmp_path):
    shards, stats = corpus(tmp_path)
    cfg = config(mixture={"code": 1, "text": 0})
    data = MixtureWindows(shards, SEQ, seed=cfg.seed, mixture=cfg.mixture, stats_file=stats)
    result = train(cfg, VOCAB, data, TokenWindows([tmp_path / "val-00000.arrow"], SEQ), tmp_path / "out",
                   progress=False)  # fmt: skip
    assert result.tokens_seen_by["by_format"] == {"code": result.tokens_seen}
    written = json.loads((tmp_path / "out" / TOKENS_SEEN_FILE).read_text())
    assert written["by_format"] == {"code": result.tokens_seen} and written["mixture"] == cfg.mixture


@pytest.mark.filterwarnings("ignore:the corpus is small")
def test_the_train_stage_logs_tokens_seen_and_keeps_them_in_its_manifest(tmp_path):
    from refinery.tasks.train import run_train

    shards_dir = tmp_path / "shards"
    shards_dir.mkdir()
    files, _ = corpus(shards_dir)
    shards = Shards(
        stage="shards", dir=shards_dir, digest="d", documents=61, train_files=files,
        val_files=[shards_dir / "val-00000.arrow"], vocab_size=VOCAB, eot_id=EOT,
        train_tokens=TokenWindows(files, SEQ).num_tokens, val_tokens=40, train_bytes=0, val_bytes=0,
    )  # fmt: skip
    logged: list[dict[str, float]] = []
    result = run_train(shards, tmp_path / "train", config(mixture={"text": 1}), run_key="k",
                       on_metrics=lambda step, m: logged.append(m), progress=False)  # fmt: skip
    assert result.metrics["tokens_seen.format.text"] == result.metrics["tokens_seen"]
    assert "tokens_seen.format.code" not in result.metrics
    assert result.extra["tokens_seen_by_format"] == {"text": int(result.metrics["tokens_seen"])}
    assert TOKENS_SEEN_FILE in {o.path for o in result.outputs}
    assert len([m for m in logged if "loss" in m]) == 4
