"""A decoder-only transformer in one file: RoPE, RMSNorm, SwiGLU, grouped-query attention.

The network is the Llama shape (so it exports to `transformers` without surprises)
written to be read top to bottom:

    tokens -> embedding -> n_layer x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> logits

Two choices are made for speed rather than style, and both are invisible from the
outside: the q/k/v projections are one matrix (`qkv`) and so are the SwiGLU gate and
up projections (`gate_up`), which halves the number of matmuls per token during
generation; and the training loss never builds the full `(tokens, vocab)` logits
tensor in the autograd graph (`LinearCrossEntropy`), which saves a pass over the
largest activation of a small model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

# ----------------------------------------------------------------------------- config


class GPTConfig(BaseModel):
    """Shape of the network. `ffn_hidden=None` derives the SwiGLU width as ~8/3 d_model."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(ge=2, description="tokenizer vocabulary size")
    seq_len: int = Field(default=256, ge=1, description="context length (maximum positions)")
    n_layer: int = Field(default=4, ge=1)
    n_head: int = Field(default=4, ge=1)
    n_kv_head: int | None = Field(default=None, ge=1, description="key/value heads (GQA); n_head when None")
    d_model: int = Field(default=256, ge=2)
    ffn_hidden: int | None = Field(
        default=None, ge=1, description="SwiGLU hidden width; ~8/3 d_model when None"
    )
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _derive(self) -> GPTConfig:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"head size d_model/n_head = {self.d_model // self.n_head} must be even for RoPE"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# Named sizes. `vocab_size` comes from the tokenizer, so it is not part of a preset.
PRESETS: dict[str, dict[str, Any]] = {
    # A few thousand parameters plus the embedding: for unit tests on CPU.
    "test": dict(seq_len=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64),
    # The CPU sizes `train.preset: auto` chooses among (refinery.model.sizing). ~0.85M parameters in the
    # blocks plus 1.0M in an 8k embedding and 1.0M in its own output head: at this width one matrix
    # can't serve both well, and untied it reached a lower validation loss at the same steps on the
    # sample (docs/model.md), for the same matmul FLOPs.
    "cpu-tiny": dict(seq_len=256, n_layer=4, n_head=4, d_model=128, tie_embeddings=False),
    # ~1.8M in the blocks plus 1.6M in an 8k embedding; fp32 on 2 CPU cores about 2,900 tokens/s.
    "cpu-small": dict(seq_len=256, n_layer=4, n_head=6, d_model=192),
    # ~6.4M in the blocks plus 2.1M in an 8k embedding: for more cores, more time or more data.
    "cpu-base": dict(seq_len=256, n_layer=8, n_head=8, d_model=256),
    # A small GPU size between cpu-base and GPT-2 small: ~10.6M in the blocks (the shape of nanoGPT's
    # Shakespeare character model).
    "gpt2-mini": dict(seq_len=1024, n_layer=6, n_head=6, d_model=384),
    # GPT-2 small: 124M parameters with a 50k vocabulary.
    "gpt2-small": dict(seq_len=1024, n_layer=12, n_head=12, d_model=768),
    # A 350M-class model (GPT-2 medium depth and width, SwiGLU), GQA with 4 key/value heads.
    "350m": dict(seq_len=1024, n_layer=24, n_head=16, n_kv_head=4, d_model=1024),
}


def config_from_preset(name: str, vocab_size: int, **overrides: Any) -> GPTConfig:
    """A preset with its vocabulary and any overrides (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    if "d_model" in overrides and "ffn_hidden" not in overrides:
        fields.pop("ffn_hidden", None)  # re-derive the MLP width for the new d_model
    return GPTConfig(vocab_size=vocab_size, **fields)


# ----------------------------------------------------------------------------- building blocks


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (max_len, head_dim), in the `rotate_half` convention Llama uses.

    Pair (i, i + D/2) rotates by angle_i: cos is [cos, cos] and sin is [-sin, sin], so
    that `apply_rope` is two products and a sum over the whole head at once.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by the angles in cos/sin (T or B,1,T, D) of `rope_tables`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.device.type == "cpu":
            return RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RMSNormFn(torch.autograd.Function):
    """x / rms(x) * weight with a hand-written backward, for training on a CPU.

    On a CPU `F.rms_norm` runs as half a dozen separate operations forward and
    more backward; this keeps the normalised input and 1/rms from the forward pass
    and needs fewer passes over the activations backward (the norms were ~9% of
    a training step of the small presets). Same formula, same values.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        rstd = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True).add_(eps))
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        grad_xhat = grad * weight
        grad_weight = (grad * xhat).flatten(0, -2).sum(0)
        dot = (grad_xhat * xhat).mean(dim=-1, keepdim=True)
        return torch.addcmul(grad_xhat, xhat, dot, value=-1).mul_(rstd), grad_weight, None


class KVCache:
    """Pre-allocated keys and values, one (B, n_kv_head, max_len, head_dim) tensor per layer.

    One tensor per layer, not one for all layers, so that a compiled step's
    in-place write of one slot stays in place instead of copying the cache.

    `pos` is the number of positions already written; the model writes the next
    `T` positions at each forward call and advances it. A static decoding step
    (`GPT.forward(..., slot=...)`) instead writes one position at the slot it is
    given and leaves `pos` alone, so that its shapes never change.
    """

    def __init__(
        self, cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # Zeros, not empty: a static step attends over unwritten slots under a mask, and a
        # masked weight of 0 times a NaN left in uninitialised memory would still be NaN.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
        slot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
        # q and k sit side by side in the fused projection: rotate them in one pass (half the ops per token).
        # split, not slicing: its backward concatenates the grads instead of zero-filling
        # a full-size tensor per slice and adding them.
        qk, v = qkv.split((H + Hkv, Hkv), dim=1)
        q, k = apply_rope(qk, cos, sin).split((H, Hkv), dim=1)
        is_causal = mask is None and T > 1
        if cache is not None and slot is not None:  # static step: write one slot, attend over the whole cache
            cache.k[layer].index_copy_(2, slot, k)
            cache.v[layer].index_copy_(2, slot, v)
            k, v = cache.k[layer], cache.v[layer]
        elif cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start : start + T] = k
            cache.v[layer][:, :, start : start + T] = v
            k, v = cache.k[layer][:, :, : start + T], cache.v[layer][:, :, : start + T]
            if start > 0 and T > 1 and mask is None:  # a chunk after a prefix: causal with an offset
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            is_causal = is_causal and start == 0
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=Hkv != H,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        if torch.is_grad_enabled():
            return self.down(SiluGate.apply(gu))
        gate, up = gu.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SiluGate(torch.autograd.Function):
    """silu(gate) * up for gate, up = the two halves of `gu`, with the gradient written in place.

    Autograd's own version computes the two halves' gradients separately and then
    concatenates them: one more pass over the widest activation of the block.
    """

    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gate, up, act = ctx.saved_tensors
        grad_gu = torch.empty(*gate.shape[:-1], 2 * gate.shape[-1], dtype=grad.dtype, device=grad.device)
        grad_gate, grad_up = grad_gu.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.mul(grad, up, out=grad_gate)  # d(loss)/d(act), then through silu in place
        torch.ops.aten.silu_backward(grad_gate, gate, grad_input=grad_gate)
        return grad_gu


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache, layer, mask, slot=None):  # type: ignore[no-untyped-def]
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask, slot))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# ----------------------------------------------------------------------------- the loss


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of `h @ weight.T` against `targets`, in row chunks.

    Forward computes the loss and, while the logits of a chunk are at hand, the
    gradients too; backward only scales them. The full logits never sit in the
    graph, and softmax + its backward become one pass. Under autocast the matmuls
    run in the autocast dtype and the softmax in fp32, as `F.cross_entropy` would.
    """

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, need_grad: bool
    ):  # type: ignore[override]
        dtype = (
            torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        )
        with torch.autocast(h.device.type, enabled=False):
            h2, w = h.reshape(-1, h.shape[-1]).to(dtype), weight.to(dtype)
            t = targets.reshape(-1)
            n = t.numel()
            grad_h = torch.empty_like(h2)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            buf = torch.empty(min(chunk_rows, n), w.shape[0], dtype=torch.float32, device=h.device)
            gbuf = torch.empty_like(buf, dtype=dtype) if dtype != torch.float32 else None
            for s in range(0, n, chunk_rows):
                hc, tc = h2[s : s + chunk_rows], t[s : s + chunk_rows]
                # Every pass over the (rows, vocab) logits is in place: at this size the
                # passes are bound by memory, and a fresh temporary per pass costs more
                # (page faults on new memory) than the arithmetic.
                logits = buf[: hc.shape[0]]  # one buffer for every chunk's logits
                if dtype == torch.float32:
                    torch.mm(hc, w.T, out=logits)
                else:
                    logits.copy_(hc @ w.T)
                target = logits.gather(1, tc[:, None]).squeeze(1)
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()  # unnormalised softmax
                norm = probs.sum(dim=-1, keepdim=True)
                total += (peak.squeeze(1) + norm.log().squeeze(1) - target).sum()
                if not need_grad:
                    continue
                # The gradient of the mean loss, (softmax - one-hot) / n, in one pass that also
                # casts to the matmul dtype: subtract the one-hot scaled by norm first.
                probs.scatter_add_(1, tc[:, None], -norm)
                if dtype == torch.float32:
                    g = probs.div_(norm * n)
                else:
                    g = torch.div(probs, norm * n, out=gbuf[: hc.shape[0]])
                grad_h[s : s + chunk_rows] = g @ w
                if dtype == torch.float32:
                    grad_w.addmm_(g.T, hc)
                else:
                    grad_w.add_(g.T @ hc)
        ctx.save_for_backward(grad_h.view(h.shape), grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_out).to(h_dtype), (grad_w * grad_out).to(w_dtype), None, None, None


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Rows of logits per chunk of the loss; None: 512 on a CPU (fastest of 256-2048 measured on
        # cpu-small, the chunk stays in cache), 2048 elsewhere (larger matmuls for a GPU).
        self.loss_chunk_rows: int | None = None
        self.apply(self._init_weights)
        # Residual branches start small so the sum of 2 * n_layer of them stays O(1) (GPT-2).
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(block.mlp.down.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, mean loss in nats) with them.

        For generation: `cache` continues from `cache.pos`; `positions` (B, T) gives
        per-row positions and `mask` (B, 1, T, S) which keys each query may see, for
        left-padded batches of prompts of different lengths.

        A static decoding step passes `slot`, a (1,) tensor: the one new position
        per row goes to that cache slot, and attention runs over the whole cache
        under `mask` (B, 1, 1, cache.max_len), with `positions` (B, 1) required.
        Every shape is then fixed, so `torch.compile` traces the step once.
        """
        B, T = idx.shape
        if slot is not None and (cache is None or positions is None or mask is None or T != 1):
            raise ValueError("a static step (slot) needs a cache, positions, a mask and one token per row")
        start = cache.pos if cache is not None and slot is None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.drop(self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask, slot)
        if cache is not None and slot is None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None
        need_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
        chunk_rows = self.loss_chunk_rows or (512 if x.device.type == "cpu" else 2048)
        loss = LinearCrossEntropy.apply(x, self.lm_head.weight, targets, chunk_rows, need_grad)
        return None, loss

    def num_params(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12 * L * d * T for attention (PaLM, App. B).

        N counts the output projection, the matmul that actually runs, once; the input
        lookup costs no FLOPs, so an untied input table is left out.
        """
        T = seq_len or self.cfg.seq_len
        lookup = 0 if self.cfg.tie_embeddings else self.embed.weight.numel()  # an untied input table: no matmul
        return 6.0 * (self.num_params() - lookup) + 12.0 * self.cfg.n_layer * self.cfg.d_model * T
