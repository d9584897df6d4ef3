"""LoRA: only adapters train, the base stays bit-identical, loss drops on the domain, merging is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from refinery.model.checkpoint import load_model, save_checkpoint
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.lora import (
    ADAPTER_FILE,
    LoRAConfig,
    LoRALinear,
    LoRATrainConfig,
    apply_lora,
    count_params,
    load_lora,
    lora_state_dict,
    merge_lora,
    train_lora,
)
from refinery.storage.shards import TokenWindows, write_token_shard

VOCAB = 64
SEQ = 32


# Tiny matmuls are fastest, and steadiest on a shared machine, on one thread.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _docs(seed: int, strides: tuple[int, ...], n_docs: int) -> list[np.ndarray]:
    """Documents counting upward in the given strides, closed by the end-of-text id VOCAB-1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        start, stride, n = rng.integers(0, VOCAB - 1), rng.choice(strides), rng.integers(20, 80)
        out.append(np.array([*((start + stride * np.arange(n)) % (VOCAB - 1)), VOCAB - 1], dtype=np.uint16))
    return out


def _shards(folder: Path, name: str, docs: list[np.ndarray], n_val: int) -> tuple[Path, Path]:
    ids = [f"{name}{i}" for i in range(len(docs))]
    write_token_shard(folder / f"{name}-train.arrow", ids[n_val:], docs[n_val:], VOCAB)
    write_token_shard(folder / f"{name}-val.arrow", ids[:n_val], docs[:n_val], VOCAB)
    return folder / f"{name}-train.arrow", folder / f"{name}-val.arrow"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A base model pre-trained on small strides, and a domain set of large strides it has not seen."""
    folder = tmp_path_factory.mktemp("lora")
    general = _shards(folder, "general", _docs(0, (1, 2), 120), 20)
    domain = _shards(folder, "domain", _docs(1, (5, 7), 80), 16)
    torch.manual_seed(0)
    model = GPT(config_from_preset("test", VOCAB, seq_len=SEQ))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = TokenWindows([general[0]], SEQ)
    for _ in range(40):
        x, y = windows.next_batch(8)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(folder / "base" / "checkpoint", model)
    return {"base": folder / "base" / "checkpoint", "train": domain[0], "val": domain[1], "root": folder}


def base_model(data) -> torch.nn.Module:
    return load_model(data["base"])


def fit(model, data, out: Path, lora: LoRAConfig | None = None, on_metrics=None, **overrides):
    tc = LoRATrainConfig(**{
        "max_steps": 30, "micro_batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3, "eval_every": 15,
        "eval_batches": 4, "precision": "fp32", "device": "cpu", **overrides,
    })  # fmt: skip
    return train_lora(
        model, lora or LoRAConfig(rank=4, alpha=8), TokenWindows([data["train"]], SEQ, seed=1),
        TokenWindows([data["val"]], SEQ), out, tc, on_metrics=on_metrics, progress=False,
    )  # fmt: skip


def test_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ValidationError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValidationError, match="dropout"):
        LoRAConfig(dropout=1.5)
    with pytest.raises(ValidationError, match="target_modules"):
        LoRAConfig(target_modules=[])
    with pytest.raises(ValidationError, match="extra"):
        LoRAConfig(ranks=4)
    with pytest.raises(ValidationError, match="max_steps"):
        LoRATrainConfig(max_steps=0)


def test_apply_wraps_attention_and_mlp_projections_and_starts_as_the_identity(data):
    model = base_model(data)
    x = torch.randint(0, VOCAB, (2, SEQ))
    before, _ = model(x)
    wrapped = apply_lora(model, LoRAConfig(rank=4))
    n_layer = model.cfg.n_layer
    assert len(wrapped) == 4 * n_layer
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"qkv", "proj", "gate_up", "down"}
    assert "lm_head" not in wrapped  # tied to the embedding: never wrapped
    after, _ = model(x)
    torch.testing.assert_close(before, after, atol=0, rtol=0)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    n_train, n_total = count_params(model)
    assert 0 < n_train < n_total / 5
    # The base weights keep their names, so a base checkpoint's keys are all still there.
    assert "blocks.0.attn.qkv.weight" in model.state_dict()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_patterns_select_layers_and_a_pattern_matching_nothing_says_what_exists(data):
    model = base_model(data)
    assert apply_lora(model, LoRAConfig(target_modules=["blocks.1.attn.*"])) == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]
    with pytest.raises(ValueError, match="blocks.0.attn.qkv"):
        apply_lora(base_model(data), LoRAConfig(target_modules=["*.q_proj"]))


def test_training_changes_only_adapters_and_lowers_domain_loss(data, tmp_path):
    model = base_model(data)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[int, dict]] = []
    result = fit(model, data, tmp_path / "adapter", on_metrics=lambda step, m: seen.append((step, m)))
    state = model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(state[key], value), f"base weight {key} changed"
    adapters = lora_state_dict(model)
    assert set(adapters) == set(state) - set(base_before)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))
    assert result.val_loss < result.val_loss_before - 0.3, result
    assert result.steps == 30 and result.trainable_params < result.total_params
    assert (tmp_path / "adapter" / ADAPTER_FILE).is_file()
    lines = result.metrics_file.read_text().splitlines()
    assert len(lines) == 31 and '"val_loss"' in lines[0]
    assert [step for step, _ in seen] == list(range(1, 31))
    assert "val_loss" in seen[14][1] and "val_loss" not in seen[13][1] and seen[-1][1]["lr"] > 0


def test_merge_gives_the_same_logits_and_a_plain_checkpoint(data, tmp_path):
    model = base_model(data)
    fit(model, data, tmp_path / "adapter", max_steps=10)
    x = torch.randint(0, VOCAB, (3, SEQ))
    with torch.no_grad():
        unmerged, _ = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        merged, _ = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # The merged model is an ordinary model again: it saves and loads like the base.
    save_checkpoint(tmp_path / "merged", model, meta={"step": 10})
    reloaded = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], merged, atol=0, rtol=0)
    assert set(reloaded.state_dict()) == set(base_model(data).state_dict())


def test_adapters_kept_separate_reload_onto_a_fresh_base(data, tmp_path):
    model = base_model(data)
    fit(model, data, tmp_path / "adapter", max_steps=5, eval_every=5)
    x = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        expected, _ = model(x)
    fresh = base_model(data)
    wrapped = load_lora(fresh, tmp_path / "adapter")
    assert len(wrapped) == 4 * fresh.cfg.n_layer
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], expected, atol=0, rtol=0)
    # The adapter file is small: adapters only, no base weights.
    size = (tmp_path / "adapter" / ADAPTER_FILE).stat().st_size
    assert size < sum(v.numel() * 4 for v in base_model(data).state_dict().values()) / 3
    with pytest.raises(FileNotFoundError, match="train_lora"):
        load_lora(base_model(data), tmp_path / "nowhere")


def test_dropout_only_acts_in_training(data):
    model = base_model(data)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B)
    x = torch.randint(0, VOCAB, (2, SEQ))
    model.eval()
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        model.train()
        assert not torch.equal(model(x)[0], a)
