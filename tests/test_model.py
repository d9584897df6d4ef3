"""The network, its loss, the KV cache, generation and the evaluation helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from refinery.model.evaluate import bits_per_byte, unigram_loss
from refinery.model.generate import compile_unavailable, generate
from refinery.model.gpt import GPT, PRESETS, GPTConfig, KVCache, config_from_preset

# Tiny matmuls are fastest, and steadiest on a shared machine, on one thread.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(vocab: int = 97, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(config_from_preset("test", vocab, **overrides))


def test_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ValidationError, match="n_layer"):
        GPTConfig(vocab_size=100, n_layer=0)
    with pytest.raises(ValidationError, match="n_kv_head"):
        GPTConfig(vocab_size=100, n_head=4, n_kv_head=3)
    with pytest.raises(ValidationError, match="extra"):
        GPTConfig(vocab_size=100, width=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("huge", 100)


def test_presets_have_their_advertised_sizes():
    with torch.device("meta"):
        gpt2 = GPT(config_from_preset("gpt2-small", 50257))
        m350 = GPT(config_from_preset("350m", 50257))
    assert 120e6 < gpt2.num_params() < 128e6
    assert 300e6 < m350.num_params() < 400e6
    assert set(PRESETS) >= {"test", "cpu-small", "gpt2-small", "350m"}
    cfg = config_from_preset("cpu-small", 8192, d_model=96)
    assert cfg.d_model == 96 and cfg.ffn_hidden == 64 * math.ceil(8 * 96 / 3 / 64)
    # 6N plus the attention term.
    small = tiny()
    assert small.flops_per_token() == 6 * small.num_params() + 12 * 2 * 64 * 64


def test_fused_loss_matches_cross_entropy_and_its_gradients():
    model = tiny()
    model.loss_chunk_rows = 37  # several chunks, the last one ragged
    x, y = torch.randint(0, 97, (3, 50)), torch.randint(0, 97, (3, 50))
    _, loss = model(x, y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(x)
    reference = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        assert model(x, y)[1].item() == pytest.approx(reference.item(), abs=1e-6)


def test_fused_loss_under_bf16_autocast_matches_cross_entropy():
    model = tiny()
    model.loss_chunk_rows = 37
    x, y = torch.randint(0, 97, (3, 50)), torch.randint(0, 97, (3, 50))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
        reference = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    reference.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(fused[name], p.grad, atol=2e-3, rtol=5e-2, msg=name)


def test_hand_written_backward_passes_match_autograd():
    """RMSNormFn and SiluGate (the CPU training fast paths) against numerical gradients and plain ops."""
    from refinery.model.gpt import RMSNormFn, SiluGate

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFn.apply(a, b, 1e-5), (x, w))
    torch.testing.assert_close(RMSNormFn.apply(x, w, 1e-5), F.rms_norm(x, (8,), w, 1e-5))
    gu = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluGate.apply, (gu,))
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(SiluGate.apply(gu), F.silu(gate) * up)


def test_model_overfits_a_tiny_batch():
    model = tiny()
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05


def test_kv_cache_forward_equals_full_forward():
    model = tiny().eval()
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.cfg, 2, 40, "cpu", torch.float32)
        parts = [model(x[:, a:b], cache=cache)[0] for a, b in ((0, 10), (10, 11), (11, 30), (30, 40))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def _trained_to_count() -> GPT:
    """A model that learned 'next token = this + 1', so greedy decoding is meaningful."""
    model = tiny(vocab=50)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        start = torch.randint(0, 49, (8, 1), generator=g)
        seq = (start + torch.arange(33)) % 49
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_cached_greedy_generation_equals_uncached_and_rows_equal_alone():
    model = tiny(vocab=97, n_kv_head=2).eval()
    prompts = [[5, 6, 7], [20], [1, 2, 3, 4, 5, 6, 7, 8]]
    cached = generate(model, prompts, 24, temperature=0, use_cache=True)
    uncached = generate(model, prompts, 24, temperature=0, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 24 for row in cached)
    # Left padding changes nothing: each row decodes as it would alone.
    assert [generate(model, [p], 24, temperature=0)[0] for p in prompts] == cached


def test_static_decode_step_equals_the_growing_cache_step():
    """The slot-addressed step that `compile=True` runs gives the logits of the plain cached step."""
    model = tiny(vocab=97, n_kv_head=2).eval()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    grow = KVCache(model.cfg, 2, 16, "cpu", torch.float32)
    static = KVCache(model.cfg, 2, 16, "cpu", torch.float32)
    slots = torch.arange(16)
    with torch.no_grad():
        model(x[:, :8], cache=grow)
        model(x[:, :8], cache=static)
        for t in range(8, 16):
            expected = model(x[:, t : t + 1], cache=grow)[0]
            mask = (slots <= t).expand(2, 16)[:, None, None, :]
            got = model(x[:, t : t + 1], cache=static, positions=slots[t : t + 1].expand(2, 1).contiguous(),
                        mask=mask, slot=slots[t : t + 1])[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert static.pos == 8  # the static step never moves the cache's cursor
    with pytest.raises(ValueError, match="static step"):
        model(x[:, :2], cache=static, slot=slots[:1])


@pytest.mark.skipif(
    compile_unavailable(torch.device("cpu")) is not None, reason=str(compile_unavailable(torch.device("cpu")))
)
def test_compiled_generation_gives_the_tokens_of_eager_generation():
    model = tiny(vocab=97, n_kv_head=2).eval()
    prompts = [[5, 6, 7], [20], [1, 2, 3, 4, 5, 6, 7, 8]]  # left-padded: masks and positions per row
    eager = generate(model, prompts, 12, temperature=0)
    assert generate(model, prompts, 12, temperature=0, compile=True) == eager
    sampled = generate(model, prompts, 12, temperature=0.9, top_k=20, seed=5)
    assert generate(model, prompts, 12, temperature=0.9, top_k=20, seed=5, compile=True) == sampled
    # int8 weights (`refinery generate --int8 --compile`) trace through the same step.
    from refinery.model.quantize import quantize_int8

    quantize_int8(model)
    eager_int8 = generate(model, prompts, 12, temperature=0.9, top_k=20, seed=5)
    assert generate(model, prompts, 12, temperature=0.9, top_k=20, seed=5, compile=True) == eager_int8


def test_compiled_generation_without_a_compiler_says_what_to_install(monkeypatch):
    import refinery.model.generate as gen_module

    monkeypatch.setattr(gen_module.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="install g\\+\\+"):
        generate(tiny().eval(), [[1, 2]], 4, temperature=0, compile=True)
    assert len(generate(tiny().eval(), [[1, 2]], 4, temperature=0)[0]) == 4  # eager needs no compiler


def test_generation_samples_streams_and_stops_at_eos():
    model = _trained_to_count()
    greedy = generate(model, [[3, 4, 5]], 8, temperature=0)[0]
    assert greedy == [6, 7, 8, 9, 10, 11, 12, 13]
    assert generate(model, [[3, 4, 5]], 8, temperature=1.0, top_k=1)[0] == greedy
    assert generate(model, [[3, 4, 5]], 8, temperature=0.7, top_p=1e-6)[0] == greedy
    # Same seed, same samples; full-distribution sampling stays in the vocabulary.
    a = generate(model, [[1], [2]], 10, temperature=1.5, seed=7)
    assert a == generate(model, [[1], [2]], 10, temperature=1.5, seed=7)
    assert all(0 <= t < 50 for row in a for t in row)
    streamed: list[tuple[int, int]] = []
    out = generate(model, [[3, 4, 5], [20, 21]], 8, temperature=0, eos_id=9, on_token=lambda r, t: streamed.append((r, t)))
    assert out[0] == [6, 7, 8]  # stopped before the end-of-text token
    assert out[1] == [22, 23, 24, 25, 26, 27, 28, 29]
    assert sorted(streamed) == sorted([(0, t) for t in out[0]] + [(1, t) for t in out[1]])
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1]], 100)


def test_top_k_and_top_p_restrict_the_sampled_set():
    model = tiny().eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))[0][0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    rows = generate(model, [[1, 2, 3]] * 64, 1, temperature=1.0, top_k=3, seed=1)
    assert {r[0] for r in rows} <= top3


def test_unigram_loss_and_bits_per_byte():
    vocab = 16
    uniform = np.arange(vocab).repeat(100)
    assert unigram_loss(uniform, uniform, vocab) == pytest.approx(math.log(vocab))
    skewed = np.zeros(1000, dtype=np.int64)
    assert unigram_loss(skewed, skewed, vocab) < 0.05  # a constant stream is nearly free
    assert unigram_loss(skewed, np.ones(10, np.int64), vocab) > math.log(vocab)  # unseen tokens cost more
    assert bits_per_byte(math.log(2), n_tokens=100, n_bytes=400) == pytest.approx(0.25)
