"""`train.nproc`: the train stage launches torchrun (gloo processes on a CPU) and records the result as usual."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_mixture import EOT, SEQ, VOCAB, corpus

from refinery.model.checkpoint import load_model
from refinery.model.train import TrainConfig
from refinery.storage.mixture import TOKENS_SEEN_FILE
from refinery.tasks.train import check_nproc, run_train

pytestmark = [pytest.mark.filterwarnings("ignore:the corpus is small"), pytest.mark.usefixtures("torch_one_thread")]


def shards_of(folder):
    from refinery.storage.outputs import Shards
    from refinery.storage.shards import TokenWindows

    folder.mkdir()
    files, _ = corpus(folder)
    return Shards(
        stage="shards", dir=folder, digest="d", documents=61, train_files=files,
        val_files=[folder / "val-00000.arrow"], vocab_size=VOCAB, eot_id=EOT,
        train_tokens=TokenWindows(files, SEQ).num_tokens, val_tokens=40, train_bytes=0, val_bytes=0,
    )  # fmt: skip


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{
        "preset": "test", "seq_len": SEQ, "micro_batch_size": 2, "tokens_per_step": 4 * SEQ, "max_steps": 4,
        "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "precision": "fp32",
        "device": "cpu", "max_time_s": None, "mixture": {"code": 1, "text": 1}, **overrides,
    })  # fmt: skip


@pytest.mark.slow  # 20-90 s on two busy cores: three interpreters import torch, then a one-process reference run
def test_two_gloo_processes_train_like_one_and_report_through_the_stage(tmp_path):
    shards = shards_of(tmp_path / "shards")
    single = run_train(shards, tmp_path / "one", config(), run_key="k", progress=False)
    logged: list[tuple[int, dict[str, float]]] = []
    ddp = run_train(shards, tmp_path / "two", config(nproc=2), run_key="k", progress=False,
                    on_metrics=lambda step, m: logged.append((step, m)))  # fmt: skip

    assert [step for step, m in logged if "loss" in m] == [1, 2, 3, 4]  # streamed from rank 0, step by step
    assert ddp.metrics["steps"] == single.metrics["steps"] == 4
    np.testing.assert_allclose(ddp.metrics["train_loss"], single.metrics["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(ddp.metrics["val_loss"], single.metrics["val_loss"], rtol=1e-5)
    # Both ranks' windows are counted once: the same tokens, by format, as the one-process run.
    assert ddp.extra["tokens_seen_by_format"] == single.extra["tokens_seen_by_format"]
    assert json.loads((tmp_path / "two" / TOKENS_SEEN_FILE).read_text())["total"] == 4 * 4 * SEQ
    model = load_model(tmp_path / "two" / ddp.extra["checkpoint_dir"])  # what the pipeline registers
    assert model.cfg.vocab_size == VOCAB
    assert ddp.extra["nproc"] == 2


def test_more_processes_than_gpus_is_refused_before_launching():
    import torch

    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPUs"):
            check_nproc(config(device="cuda", nproc=torch.cuda.device_count() + 1))
    assert check_nproc(config(device="cpu", nproc=4)) == "cpu"
