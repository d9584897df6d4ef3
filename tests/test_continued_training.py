"""Continued training (`train.init_from`): warm starts from the last checkpoint or a registered model.

A tiny model on token documents that count upward in strides (predictable, so a
trained model's loss is far below a fresh one's), the train stage's own
function, and a real MLflow store (SQLite) for the registered-model case.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from refinery.flows.stages import PIPELINE
from refinery.model.checkpoint import load_model
from refinery.model.train import TrainConfig
from refinery.storage.manifest import build_manifest, config_hash
from refinery.storage.outputs import Shards
from refinery.storage.shards import TokenWindows, write_token_shard
from refinery.tasks.train import INIT_DIR, InitFromError, run_train

VOCAB = 64
SEQ = 32
MICRO = 8

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def write_tokenizer(path: Path, reverse: bool = False) -> Path:
    """A word-level tokenizer over VOCAB tokens; `reverse` gives the same words other ids (a retrained tokenizer)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = [f"w{i}" for i in range(VOCAB - 1)] + ["<|endoftext|>"]
    order = list(reversed(words)) if reverse else words
    Tokenizer(WordLevel({w: i for i, w in enumerate(order)}, unk_token="<|endoftext|>")).save(str(path))
    return path


@pytest.fixture
def shards(tmp_path) -> Shards:
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(160):
        start, stride, n = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(20, 90)
        docs.append(((start + stride * np.arange(n)) % (VOCAB - 1)).astype(np.uint16).tolist() + [VOCAB - 1])
    ids = [f"d{i}" for i in range(len(docs))]
    folder = tmp_path / "shards"
    folder.mkdir()
    write_token_shard(folder / "train.arrow", ids[:140], [np.array(d) for d in docs[:140]], VOCAB)
    write_token_shard(folder / "val.arrow", ids[140:], [np.array(d) for d in docs[140:]], VOCAB)
    tokens = [sum(len(d) for d in docs[:140]), sum(len(d) for d in docs[140:])]
    return Shards(
        stage="shards", dir=folder, digest="shards-digest", documents=len(docs), train_files=[folder / "train.arrow"],
        val_files=[folder / "val.arrow"], vocab_size=VOCAB, eot_id=VOCAB - 1, train_tokens=tokens[0],
        val_tokens=tokens[1], train_bytes=0, val_bytes=0,
    )  # fmt: skip


@pytest.fixture
def tokenizer(tmp_path) -> Path:
    return write_tokenizer(tmp_path / "tokenizer.json")


def config(**overrides) -> TrainConfig:
    base = dict(
        preset="test", seq_len=SEQ, micro_batch_size=MICRO, tokens_per_step=2 * MICRO * SEQ, max_steps=20,
        lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=1000, eval_batches=1, checkpoint_every=1000,
        precision="fp32", device="cpu", max_time_s=None,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def train_stage(shards: Shards, stage_dir: Path, cfg: TrainConfig, input_digest: str, **kwargs) -> tuple:
    """The stage as the pipeline runs it; returns (result, the training losses it reported, step by step)."""
    losses: list[float] = []
    result = run_train(
        shards, stage_dir, cfg, run_key=input_digest + config_hash(cfg), progress=False, input_digest=input_digest,
        code_version=PIPELINE["train"].code_version, on_metrics=lambda step, m: losses.append(m["loss"]) if "loss" in m else None, **kwargs,
    )  # fmt: skip
    return result, losses


def test_init_from_is_part_of_the_config_hash_and_scratch_keeps_old_hashes() -> None:
    assert "init_from" not in TrainConfig().model_dump()  # configs hashed before the key existed stay valid
    assert config_hash(TrainConfig(init_from="last")) != config_hash(TrainConfig())
    assert TrainConfig(**TrainConfig(init_from="models:/refinery-lm/3").model_dump()).init_from == "models:/refinery-lm/3"
    with pytest.raises(ValueError, match="init_from must be scratch, last or models:/"):
        TrainConfig(init_from="yesterday")


def test_last_continues_at_the_previous_loss_where_scratch_starts_high(shards, tokenizer, tmp_path) -> None:
    stage = tmp_path / "root" / "train"
    first, first_losses = train_stage(shards, stage, config(), "inputs-1", tokenizer_file=tokenizer)
    parent_digest = build_manifest("train", config(), "inputs-1", first, {},
                                   code_version=PIPELINE["train"].code_version).output_digest
    assert (stage / "checkpoint" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()

    # The next scheduled run: new input, init_from=last.
    cfg = config(init_from="last", max_steps=5)
    cont, cont_losses = train_stage(shards, stage, cfg, "inputs-2", tokenizer_file=tokenizer)
    _, scratch_losses = train_stage(shards, tmp_path / "scratch" / "train", config(max_steps=1), "inputs-2",
                                    tokenizer_file=tokenizer)  # fmt: skip

    final = first_losses[-1]
    assert abs(cont_losses[0] - final) / final < 0.05, (cont_losses[0], final)
    assert scratch_losses[0] > 1.5 * final, (scratch_losses[0], final)
    parent = cont.extra["init_from"]
    assert parent["kind"] == "last" and parent["complete"] is True
    assert parent["output_digest"] == parent_digest
    assert json.loads((stage / "checkpoint" / "config.json").read_text())["init_from"] == parent

    # A resume of the continued run (same key) keeps its parent; it does not take its own weights as one.
    again, _ = train_stage(shards, stage, cfg, "inputs-2", tokenizer_file=tokenizer)
    assert again.extra["init_from"] == parent


def test_last_without_a_previous_checkpoint_trains_from_scratch_with_a_warning(shards, tokenizer, tmp_path) -> None:
    with pytest.warns(UserWarning, match="no previous checkpoint"):
        result, _ = train_stage(shards, tmp_path / "train", config(init_from="last", max_steps=1), "in",
                                tokenizer_file=tokenizer)  # fmt: skip
    assert result.extra["init_from"] == {"kind": "scratch", "requested": "last", "reason": "no previous checkpoint"}


def test_a_registered_model_is_continued_and_named_as_parent(shards, tokenizer, tmp_path) -> None:
    from refinery.flows.lineage import Lineage
    from refinery.flows.lineage_graph import Node, model_nodes, parent_edges
    from refinery.storage.layout import RunLayout
    from refinery.tasks.train import _model_version

    layout = RunLayout.at(tmp_path / "root")
    layout.create(["train"])
    uri = layout.mlflow_tracking_uri
    base, _ = train_stage(shards, tmp_path / "base" / "train", config(max_steps=4), "base", tokenizer_file=tokenizer)
    base_manifest = build_manifest("train", config(max_steps=4), "base", base, {})
    checkpoint = tmp_path / "base" / "train" / "checkpoint"
    lineage = Lineage(uri, "refinery", layout.mlflow_artifacts)
    base_run = lineage.start_stage("train")
    # Version 1 holds what a registered model holds (a checkpoint and its tokenizer), logged as plain artifacts.
    lineage.client.log_artifacts(base_run, str(checkpoint), "model/checkpoint")
    lineage.client.log_artifact(base_run, str(tokenizer), "model")
    lineage.client.create_registered_model("refinery-lm")
    lineage.client.create_model_version(
        "refinery-lm", source=f"{lineage.client.get_run(base_run).info.artifact_uri}/model", run_id=base_run,
        tags={"refinery.output_digest": base_manifest.output_digest},
    )

    cfg = config(init_from="models:/refinery-lm/1", max_steps=2)
    stage = layout.stage_dir("train")
    result, losses = train_stage(shards, stage, cfg, "new", tokenizer_file=tokenizer, tracking_uri=uri)

    # Step 0 of the continued run has the registered weights: the same tensors, the same first loss.
    registered = load_file(str(checkpoint / "model.safetensors"))
    started = load_file(str(stage / INIT_DIR / "model.safetensors"))
    assert registered.keys() == started.keys() and all(torch.equal(registered[k], started[k]) for k in registered)
    model = load_model(checkpoint).train()
    x, y = TokenWindows(shards.train_files, SEQ, seed=cfg.seed).next_batch(2 * MICRO)
    with torch.no_grad():
        expected = np.mean([float(model(torch.from_numpy(x[i:i + MICRO]), torch.from_numpy(y[i:i + MICRO]))[1])
                            for i in (0, MICRO)])  # fmt: skip
    assert losses[0] == pytest.approx(expected, rel=1e-5)

    parent = result.extra["init_from"]
    assert parent == {"kind": "model", "uri": "models:/refinery-lm/1", "name": "refinery-lm", "version": "1",
                      "output_digest": base_manifest.output_digest}  # fmt: skip

    # Lineage: the train run and the new model version name their parent; the graph draws the edge.
    manifest = build_manifest("train", cfg, "new", result, {})
    run = lineage.start_stage("train")
    lineage.finish_stage(run, manifest, [], str(stage), skipped=False)
    assert lineage.client.get_run(run).data.tags["refinery.parent_model"] == "refinery-lm/1"
    _, version = lineage.log_and_register_model(run, stage / "checkpoint", tokenizer, "refinery-lm", "continued")
    lineage.client.set_model_version_tag("refinery-lm", version, "refinery.output_digest", manifest.output_digest)
    assert lineage.client.get_model_version("refinery-lm", version).tags["refinery.parent_model"] == "refinery-lm/1"
    train_node = Node("stage:train", "stage", "train", "ok", [], {"output_digest": manifest.output_digest})
    models = model_nodes(lineage.client, "refinery-lm", train_node)
    assert parent_edges(models, "refinery-lm") == [("model:1", "model:2")]
    assert _model_version("models:/refinery-lm/latest", uri)[:2] == ("refinery-lm", "2")
    with pytest.raises(InitFromError, match="not found in the MLflow registry"):
        _model_version("models:/refinery-lm/9", uri)


def test_a_changed_tokenizer_or_model_shape_is_refused_and_the_old_model_kept(shards, tokenizer, tmp_path) -> None:
    stage = tmp_path / "root" / "train"
    train_stage(shards, stage, config(max_steps=2), "inputs-1", tokenizer_file=tokenizer)
    weights = (stage / "checkpoint" / "model.safetensors").read_bytes()

    retrained = write_tokenizer(tmp_path / "retrained.json", reverse=True)
    with pytest.raises(InitFromError, match=r"the tokenizer changed since .* pin it with tokenizer.existing"):
        train_stage(shards, stage, config(init_from="last", max_steps=2), "inputs-2", tokenizer_file=retrained)
    with pytest.raises(InitFromError, match=r"n_layer 2 in the source, 1 configured.*train.n_layer=2"):
        train_stage(shards, stage, config(init_from="last", max_steps=2, n_layer=1), "inputs-2",
                    tokenizer_file=tokenizer)  # fmt: skip
    assert (stage / "checkpoint" / "model.safetensors").read_bytes() == weights  # refused before the reset


def test_the_training_plan_states_the_data_and_warns_on_a_small_corpus() -> None:
    from refinery.tasks.train import training_plan

    cfg = TrainConfig(preset="cpu-small", max_steps=300, tokens_per_step=4096)
    model_cfg = cfg.model_config_for(4096)
    small = training_plan(cfg, model_cfg, 27_000)
    assert "27,000 training tokens" in small.describe() and "45.5 epochs" in small.describe()
    assert small.small_corpus and "smaller train.preset" in small.small_corpus
    assert training_plan(cfg, model_cfg, 500_000).small_corpus is None
