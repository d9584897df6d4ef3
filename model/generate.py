"""Sampling with a pre-allocated KV cache: batched prompts, temperature, top-k, top-p, streaming.

Prompts of different lengths are left-padded; each row then gets its own RoPE
positions and a key mask hiding its padding, so a row decodes exactly as it would
alone. The cache holds `max prompt + max_new_tokens` positions from the start, so
decoding allocates nothing per token.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import torch

from refinery.model.gpt import GPT, KVCache


def _decode_step(
    model: GPT, cache: KVCache, tok: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One static-shape decoding step: (B, 1) tokens in, (B, vocab) float logits out."""
    logits, _ = model(tok, cache=cache, positions=pos, mask=mask, slot=slot)
    return logits[:, -1, :].float()


_compiled_step: Callable[..., torch.Tensor] | None = None


def compile_unavailable(device: torch.device) -> str | None:
    """Why `compile=True` can't run on `device`, or None when it can."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "torch.compile on a CPU needs a C++ compiler for its kernels: install g++ (apt install g++), or decode without compiling"
    return None


def compiled_decode_step() -> Callable[..., torch.Tensor]:
    """`_decode_step` through `torch.compile`, built once per process.

    Shapes are static (the whole cache is attended under a mask), so a model,
    batch size and cache length are traced once and later calls reuse the
    kernels. The weights stay inputs of the compiled graph (no freezing), so
    two models of the same shape can never share each other's weights.
    """
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_decode_step, dynamic=False, fullgraph=True)
    return _compiled_step


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop[..., 0] = False  # and always the likeliest: a top_p that rounds to 0 in float32 would drop them all
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
    compile: bool = False,
    generators: list[torch.Generator] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (prompt excluded, end-of-text excluded).

    `temperature=0` is greedy. A row stops at `eos_id` or after `max_new_tokens`;
    `on_token(row, token)` is called for each new token as it is chosen.
    `use_cache=False` recomputes the whole sequence each step (for testing the cache).
    `compile=True` runs every step after the prompt as one compiled static-shape
    step (`compiled_decode_step`): the first call per shape pays for compiling
    (seconds), later calls decode faster. It needs a C++ compiler on CPU.
    `generators` (one `torch.Generator` per prompt, on the model's device) gives
    each row its own random stream, so a sampled row does not depend on which
    other rows share the batch (a server can batch differently seeded requests);
    without it every row draws from one generator seeded with `seed`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with the end-of-text id for no prompt)")
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 is greedy)")
    device = next(model.parameters()).device
    if compile and (reason := compile_unavailable(device)):
        raise ValueError(reason)
    lengths = [len(p) for p in prompts]
    B, P = len(prompts), max(lengths)
    total = P + max_new_tokens
    if total > model.cfg.seq_len:
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model context {model.cfg.seq_len}"
        )
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts; give one per prompt")
    generator = torch.Generator(device=device).manual_seed(seed) if generators is None else None

    # Left-pad into one (B, total) buffer; `valid` marks real tokens, `positions` counts them per row.
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)
    valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p) :] = True
    padded = min(lengths) != P
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0) if padded else None
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()

    def mask_for(q_from: int, q_to: int) -> torch.Tensor | None:
        """(B, 1, q, k) which keys each query sees: causal and not padding; None when nothing is padded."""
        if not padded:
            return None
        return (causal[q_from:q_to, :q_to][None] & valid[:, None, :q_to]).unsqueeze(1)

    model_was_training = model.training
    model.eval()
    cache = KVCache(model.cfg, B, total, device, next(model.parameters()).dtype) if use_cache else None
    step = compiled_decode_step() if compile and cache is not None else None
    slots = torch.arange(total, device=device) if step is not None else None
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    cur = P
    try:
        for _ in range(max_new_tokens):
            if step is not None and cur > P:  # after the prompt: one static step per token
                slot = slots[cur - 1 : cur]
                pos = (positions[:, cur - 1 : cur] if positions is not None else slot.expand(B, 1)).contiguous()
                seen = (valid & (slots < cur))[:, None, None, :]
                logits = step(model, cache, tokens[:, cur - 1 : cur], slot, pos, seen)[:, None, :]
            elif cache is not None:
                start = cache.pos
                idx = tokens[:, start:cur]
                pos = positions[:, start:cur] if positions is not None else None
                logits, _ = model(idx, cache=cache, positions=pos, mask=mask_for(start, cur))
            else:
                pos = positions[:, :cur] if positions is not None else None
                logits, _ = model(tokens[:, :cur], positions=pos, mask=mask_for(0, cur))
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_tok = logits.argmax(-1)
            else:
                probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                if generators is None:
                    next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:  # each row from its own stream: its draws do not depend on the other rows
                    next_tok = torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)
                                          for i, g in enumerate(generators)]).squeeze(1)  # fmt: skip
            tokens[:, cur] = next_tok
            cur += 1
            for row, tok in enumerate(next_tok.tolist()):
                if finished[row]:
                    continue
                if tok == eos_id:
                    finished[row] = True
                    continue
                out[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
            if all(finished):
                break
    finally:
        model.train(model_was_training)
    return out
