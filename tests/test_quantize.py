"""int8 weight-only quantization: per-channel error bound, logits and validation loss close to fp32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from refinery.model.evaluate import evaluate_loss
from refinery.model.generate import generate
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.quantize import (
    Int8Linear,
    is_quantized,
    memory_report,
    quantize_int8,
    quantize_per_channel,
)
from refinery.storage.shards import TokenWindows, write_token_shard

VOCAB = 64
SEQ = 32
# Stated tolerance: int8 logits differ from fp32 by at most 2% of the fp32 logits' range.
LOGIT_TOLERANCE = 0.02


# Tiny matmuls are fastest, and steadiest on a shared machine, on one thread.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[GPT, TokenWindows]:
    """A tiny model trained for a few dozen steps on predictable documents, and its validation windows."""
    folder = tmp_path_factory.mktemp("quant")
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        start, stride, n = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(20, 80)
        docs.append(np.array([*((start + stride * np.arange(n)) % (VOCAB - 1)), VOCAB - 1], dtype=np.uint16))
    ids = [f"d{i}" for i in range(len(docs))]
    write_token_shard(folder / "train.arrow", ids[20:], docs[20:], VOCAB)
    write_token_shard(folder / "val.arrow", ids[:20], docs[:20], VOCAB)
    torch.manual_seed(0)
    model = GPT(config_from_preset("test", VOCAB, seq_len=SEQ))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = TokenWindows([folder / "train.arrow"], SEQ)
    for _ in range(60):
        x, y = windows.next_batch(8)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), TokenWindows([folder / "val.arrow"], SEQ)


def test_per_channel_rounding_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different magnitude
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert int(q.abs().max()) == 127  # each row uses the full range
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    q0, s0 = quantize_per_channel(torch.zeros(2, 4))  # an all-zero row must not divide by zero
    assert torch.equal(q0, torch.zeros(2, 4, dtype=torch.int8)) and bool(torch.isfinite(s0).all())


def test_int8_layer_matches_the_dequantized_matmul_on_every_path():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24, bias=True)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 48)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x.bfloat16()).float(), reference, atol=0.1, rtol=0.05)
    torch.testing.assert_close(layer(x), linear(x), atol=0.02, rtol=0.02)


def test_quantized_logits_and_validation_loss_stay_close_to_fp32(trained):
    model, val = trained
    q = quantize_int8(copy.deepcopy(model))
    assert is_quantized(q) and not is_quantized(model)
    x = torch.from_numpy(next(val.eval_batches(4))[0])
    with torch.no_grad():
        ref, out = model(x)[0], q(x)[0]
    spread = float(ref.max() - ref.min())
    assert float((out - ref).abs().max()) <= LOGIT_TOLERANCE * spread
    # Same greedy choice almost everywhere.
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.95
    loss_fp32 = evaluate_loss(model, val, batch_size=8)
    loss_int8 = evaluate_loss(q, val, batch_size=8)
    assert abs(loss_int8 - loss_fp32) <= 0.02 * loss_fp32, (loss_fp32, loss_int8)


def test_tied_output_projection_is_left_float_and_untied_one_is_quantized():
    torch.manual_seed(0)
    tied = quantize_int8(GPT(config_from_preset("test", VOCAB)))
    assert isinstance(tied.lm_head, torch.nn.Linear) and tied.lm_head.weight is tied.embed.weight
    n_layer = tied.cfg.n_layer
    assert sum(isinstance(m, Int8Linear) for m in tied.modules()) == 4 * n_layer
    untied_fp32 = GPT(config_from_preset("test", VOCAB)).eval()
    untied_fp32.cfg.tie_embeddings = False
    untied = GPT(untied_fp32.cfg)
    untied = quantize_int8(untied)
    assert isinstance(untied.lm_head, Int8Linear)
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        _, loss = untied(x, x)  # the fused loss reads lm_head.weight: dequantized on demand
    assert torch.isfinite(loss)
    only_mlp = quantize_int8(GPT(config_from_preset("test", VOCAB)), include=["*.mlp.*"], exclude=["blocks.0.*"])
    assert [n for n, m in only_mlp.named_modules() if isinstance(m, Int8Linear)] == [
        f"blocks.{i}.mlp.{p}" for i in range(1, n_layer) for p in ("gate_up", "down")
    ]


def test_memory_report_counts_a_quarter_for_quantized_weights(trained):
    model, _ = trained
    before = memory_report(model)
    q = quantize_int8(copy.deepcopy(model))
    after = memory_report(q)
    linear_fp32 = sum(
        m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert before.total_bytes - after.total_bytes == pytest.approx(linear_fp32 * 3 / 4, rel=0.05)
    assert after.by_dtype["int8"] == linear_fp32 // 4
    assert after.int8_layers == 4 * model.cfg.n_layer and before.int8_layers == 0
    # bf16 after quantization: the int8 weights stay int8, the rest halves.
    assert memory_report(q.to(torch.bfloat16)).by_dtype["int8"] == linear_fp32 // 4


def test_generation_runs_on_the_quantized_model_with_the_kv_cache(trained):
    model, _ = trained
    q = quantize_int8(copy.deepcopy(model))
    prompts = [[1, 2, 3, 4], [10, 12]]
    cached = generate(q, prompts, max_new_tokens=8, temperature=0)
    uncached = generate(q, prompts, max_new_tokens=8, temperature=0, use_cache=False)
    assert cached == uncached and all(len(row) == 8 for row in cached)
    assert cached[0] == generate(model, prompts, max_new_tokens=8, temperature=0)[0]  # counts on: 5, 6, 7...
