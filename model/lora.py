"""Low-rank adapters (LoRA): fine-tune a frozen model through a few small matrices.

A wrapped linear layer computes

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank)

with `W` frozen and only `A` and `B` trained. `B` starts at zero, so a freshly
wrapped model computes exactly what the base model did. Layers are chosen by
name patterns (`fnmatch` over `named_modules()` names), so nothing here depends
on how the transformer is written beyond its linear layers being `nn.Linear`.

The wrapped layer keeps the base weight under its original name (`...qkv.weight`),
so the base checkpoint still loads into a wrapped model and the adapters are the
only new keys (`...qkv.lora_A`, `...qkv.lora_B`). After training the adapters can
be kept apart (`save_lora` / `load_lora`: a small safetensors file next to a
reference to the base) or folded into the base weights (`merge_lora`), which
gives back a plain model with no extra cost at inference.

`train_lora` is a small loop in the spirit of `refinery.model.train`: AdamW over
the adapter parameters only, linear warm-up then cosine decay, mixed precision
on request, periodic validation, metrics as JSON lines.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from refinery.model.evaluate import evaluate_loss
from refinery.model.precision import PrecisionProbe
from refinery.model.train import lr_at, resolve_device, resolve_precision
from refinery.storage.atomic import atomic_path, atomic_write_json, atomic_write_text
from refinery.storage.shards import TokenWindows

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# The attention and MLP projections of `refinery.model.gpt` (q/k/v fused, SwiGLU gate/up fused).
DEFAULT_TARGETS = ["*.attn.qkv", "*.attn.proj", "*.mlp.gate_up", "*.mlp.down"]


class LoRAConfig(BaseModel):
    """Shape of the adapters: which layers get them and how big they are."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1, description="inner dimension r of the A (r x in) and B (out x r) matrices")
    alpha: float = Field(default=16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="fnmatch patterns over module names (e.g. '*.attn.qkv'); matching nn.Linear layers get adapters",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, patterns: list[str]) -> list[str]:
        if any(not p.strip() for p in patterns):
            raise ValueError("target_modules patterns must be non-empty strings")
        return patterns

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRATrainConfig(BaseModel):
    """How the adapters are trained. Field names match `TrainConfig`'s so the schedule is shared."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(default=200, ge=1, description="optimizer steps; also the cosine schedule's length")
    micro_batch_size: int = Field(default=16, ge=1, description="sequences per forward/backward")
    accum_steps: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(default=1e-3, gt=0)
    min_lr: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decay on the adapter matrices")
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global grad norm; None disables")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(default=50, ge=1, description="steps between validation runs (and one at the end)")
    eval_batches: int | None = Field(default=16, ge=1, description="validation batches per evaluation; None: all")
    max_time_s: float | None = Field(default=None, gt=0, description="stop early after this many seconds")
    seed: int = 0


class LoRAResult(BaseModel):
    steps: int
    tokens_seen: int
    train_loss: float
    val_loss_before: float
    val_loss: float
    tokens_per_s: float
    trainable_params: int
    total_params: int
    adapter_dir: Path
    metrics_file: Path


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update; the base weight keeps its name."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update `scaling * B @ A`, in the base weight's shape."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight includes the update."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """Parameters used by more than one module (e.g. an output projection tied to the embedding)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every `nn.Linear` whose name matches `cfg.target_modules`; freeze every other parameter.

    Returns the wrapped module names. Tied weights (shared with another module)
    are never wrapped, since an update to them would change both users.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() or load a fresh model first")
    shared = _shared_weight_ids(model)
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [
        name
        for name, m in linear.items()
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.target_modules) and id(m.weight) not in shared
    ]
    if not chosen:
        examples = ", ".join(sorted(linear)[:8])
        raise ValueError(
            f"target_modules {cfg.target_modules} match no (untied) nn.Linear layer; the model's linear layers "
            f"are named like: {examples}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_module(model, name, LoRALinear(linear[name], cfg.rank, cfg.alpha, cfg.dropout))
    return chosen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (`<module>.lora_A`, `<module>.lora_B`), detached, on CPU."""
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if k.endswith(".lora_A") or k.endswith(".lora_B")
    }


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain `nn.Linear` back. Returns the model."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def save_lora(model: nn.Module, cfg: LoRAConfig, out_dir: Path, meta: dict[str, Any] | None = None) -> Path:
    """Write `adapter.safetensors` (adapters only) and `adapter_config.json` into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora() first")
    with atomic_path(out_dir / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lora": cfg.model_dump_json()})
    atomic_write_json(out_dir / ADAPTER_CONFIG, {**(meta or {}), "lora": cfg.model_dump()})
    return out_dir


def load_lora(model: nn.Module, adapter_dir: Path) -> list[str]:
    """Wrap `model` as the saved adapters describe and load their weights; returns the wrapped names."""
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_FILE} in {adapter_dir}; train adapters with train_lora() first")
    with safe_open(str(path), framework="pt") as f:
        cfg = LoRAConfig.model_validate_json((f.metadata() or {})["lora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    wrapped = apply_lora(model, cfg)
    expected = set(lora_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(
            f"{path} does not fit this model: missing {sorted(expected - set(tensors))[:4]}, "
            f"unexpected {sorted(set(tensors) - expected)[:4]}; was it trained on another base model?"
        )
    model.load_state_dict(tensors, strict=False)
    return wrapped


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())


# ----------------------------------------------------------------------------- training


def train_lora(
    model: nn.Module,
    cfg: LoRAConfig,
    train_data: TokenWindows,
    val_data: TokenWindows,
    out_dir: Path,
    train_cfg: LoRATrainConfig | None = None,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> LoRAResult:
    """Train adapters on `train_data` with the base weights frozen; save them to `out_dir`.

    `model` is wrapped with `apply_lora(model, cfg)` unless it already carries
    adapters (then training continues from them). It is left wrapped and in eval
    mode, so the caller can evaluate, `merge_lora` it or save it. Writes
    `adapter.safetensors`, `adapter_config.json` (with `meta` added) and
    `metrics.jsonl` into `out_dir`.
    """
    tc = train_cfg or LoRATrainConfig()
    out_dir = Path(out_dir)
    seq_len = model.cfg.seq_len if hasattr(model, "cfg") else None
    for name, data in (("train", train_data), ("val", val_data)):
        if seq_len is not None and data.seq_len > seq_len:
            raise ValueError(
                f"{name}_data windows are {data.seq_len} tokens, longer than the model's context of {seq_len}; "
                f"build TokenWindows with seq_len<={seq_len}"
            )
    device = resolve_device(tc.device)
    # `auto` on a CPU times the base model's own shapes (a full backward: close enough to rank the precisions).
    probe = PrecisionProbe.for_model(model.cfg, tc.micro_batch_size, train_data.seq_len) if hasattr(model, "cfg") else None
    precision = resolve_precision(tc.precision, device, probe)
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(tc.seed)
    model.to(device)
    if not lora_modules(model):
        apply_lora(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = count_params(model)
    optimizer = torch.optim.AdamW(
        trainable, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay, fused=device.type == "cuda"
    )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    )

    def evaluate() -> float:
        return evaluate_loss(model, val_data, tc.micro_batch_size, tc.eval_batches, autocast_dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    val_before = evaluate()
    history.append({"step": 0, "val_loss": val_before})
    val_loss, train_loss, tokens_seen, step = val_before, float("nan"), 0, 0
    model.train()
    t_start = time.perf_counter()
    bar = tqdm(total=tc.max_steps, desc="lora", unit="step", disable=not progress)
    try:
        for step in range(1, tc.max_steps + 1):
            lr = lr_at(step - 1, tc)  # type: ignore[arg-type] - duck-typed: same field names as TrainConfig
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for _ in range(tc.accum_steps):
                x, y = train_data.next_batch(tc.micro_batch_size)
                xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                with autocast():
                    _, loss = model(xt, yt)
                (loss / tc.accum_steps).backward()
                total += float(loss.detach()) / tc.accum_steps
                tokens_seen += yt.numel()
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)) if tc.grad_clip else float("nan")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = total
            record: dict[str, float] = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm}
            elapsed = time.perf_counter() - t_start
            out_of_time = tc.max_time_s is not None and elapsed > tc.max_time_s
            if step % tc.eval_every == 0 or step == tc.max_steps or out_of_time:
                val_loss = evaluate()
                record["val_loss"] = val_loss
                model.train()
            record["tokens_per_s"] = tokens_seen / max(elapsed, 1e-9)
            history.append(record)
            if on_metrics is not None:
                on_metrics(step, {k: v for k, v in record.items() if k != "step"})
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if out_of_time:
                break
    finally:
        bar.close()
        model.eval()
    elapsed = time.perf_counter() - t_start
    metrics_file = out_dir / "metrics.jsonl"
    atomic_write_text(metrics_file, "".join(json.dumps(r) + "\n" for r in history))
    save_lora(
        model,
        cfg,
        out_dir,
        meta={**(meta or {}), "steps": step, "val_loss": val_loss, "val_loss_before": val_before},
    )
    return LoRAResult(
        steps=step,
        tokens_seen=tokens_seen,
        train_loss=train_loss,
        val_loss_before=val_before,
        val_loss=val_loss,
        tokens_per_s=tokens_seen / max(elapsed, 1e-9),
        trainable_params=n_trainable,
        total_params=n_total,
        adapter_dir=out_dir,
        metrics_file=metrics_file,
    )
