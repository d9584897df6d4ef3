"""int8 weight-only quantization for inference: a quarter of the fp32 weight memory.

Each output row `i` of a linear layer's weight gets its own scale
`s_i = max_j |W_ij| / 127`, and the weight is stored as `round(W / s)` in int8.
Activations stay in floating point: the matmul runs against the int8 weight
widened on the fly, and the per-row scale multiplies the output,
`y = (x @ Q^T) * s + b`, which is exact algebra because the scale is constant
along each output row. (PyTorch's fused `_weight_int8pack_mm` kernel was
measured 5-25x slower than this on a 2-core CPU without VNNI, so it is not used.)

Only `nn.Linear` layers are replaced, selected by name patterns, so the module
works on any model; layers whose weight is shared with another module (an
output projection tied to the embedding) are left alone, since the embedding
lookup needs the float table anyway. The int8 layer still answers `.weight`
(dequantized on demand) for code that reads it directly, such as a fused loss.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel


class Int8Linear(nn.Module):
    """A linear layer holding an int8 weight with one float scale per output channel."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight.detach())
        return cls(q, scale.to(scale_dtype or linear.weight.dtype), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor each call): for code that reads `.weight` directly."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The int8 weight is widened one layer at a time, so only one float copy exists at once.
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 weight, float32 scale of shape (out,))."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = defaultdict(int)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] += 1
    return {pid for pid, n in seen.items() if n > 1}


def quantize_int8(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> nn.Module:
    """Replace, in place, every untied `nn.Linear` whose name matches `include` and not `exclude`.

    Returns the model (in eval mode). Merge LoRA adapters first (`merge_lora`):
    their wrapped layers are not `nn.Linear` and are left as they are.
    """
    shared = _shared_weight_ids(model)
    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and id(m.weight) not in shared
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear))
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


class MemoryReport(BaseModel):
    """Bytes held by a model's parameters and buffers (shared tensors once)."""

    total_bytes: int
    by_dtype: dict[str, int]
    int8_layers: int
    float_linear_layers: int

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 2**20


def memory_report(model: nn.Module, include_buffers: bool = True) -> MemoryReport:
    """What the weights cost in memory, by dtype; non-persistent buffers (RoPE tables) included."""
    tensors: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    if include_buffers:
        tensors.update({id(b): b for b in model.buffers()})
    by_dtype: dict[str, int] = defaultdict(int)
    for t in tensors.values():
        by_dtype[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    modules = list(model.modules())
    return MemoryReport(
        total_bytes=sum(by_dtype.values()),
        by_dtype=dict(by_dtype),
        int8_layers=sum(isinstance(m, Int8Linear) for m in modules),
        float_linear_layers=sum(isinstance(m, nn.Linear) for m in modules),
    )
