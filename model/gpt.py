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
    # The default pipeline model: ~1.8M parameters in the blocks plus 1.6M in an 8k
    # embedding; fp32 on 2 CPU cores it sees a few hundred thousand tokens in 2-3 minutes.
    "cpu-small": dict(seq_len=256, n_layer=4, n_head=6, d_model=192),
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
    """cos/sin of shape (max_len, head_dim/2), in the `rotate_half` convention Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by the angles in cos/sin (T or B,1,T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class KVCache:
    """Pre-allocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim).

    `pos` is the number of positions already written; the model writes the next
    `T` positions at each forward call and advances it.
    """

    def __init__(
        self, cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
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
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
        # q and k sit side by side in the fused projection: rotate them in one pass (half the ops per token).
        q, k = apply_rope(qkv[:, : H + Hkv], cos, sin).split((H, Hkv), dim=1)
        v = qkv[:, H + Hkv :]
        is_causal = mask is None and T > 1
        if cache is not None:
            start = cache.pos
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
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
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache, layer, mask):  # type: ignore[no-untyped-def]
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask))
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
            for s in range(0, n, chunk_rows):
                hc, tc = h2[s : s + chunk_rows], t[s : s + chunk_rows]
                logits = (hc @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if not need_grad:
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs.scatter_add_(1, tc[:, None], torch.full_like(lse[:, None], -1.0))
                g = probs.div_(n).to(dtype)
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
        self.loss_chunk_rows = 2048
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
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, mean loss in nats) with them.

        For generation: `cache` continues from `cache.pos`; `positions` (B, T) gives
        per-row positions and `mask` (B, 1, T, S) which keys each query may see, for
        left-padded batches of prompts of different lengths.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.drop(self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None
        need_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
        loss = LinearCrossEntropy.apply(x, self.lm_head.weight, targets, self.loss_chunk_rows, need_grad)
        return None, loss

    def num_params(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12 * L * d * T for attention (PaLM, App. B).

        With tied embeddings N includes the output projection once, which is the
        matmul that actually runs; the input lookup costs no FLOPs.
        """
        T = seq_len or self.cfg.seq_len
        return 6.0 * self.num_params() + 12.0 * self.cfg.n_layer * self.cfg.d_model * T
