"""The training loop: AdamW, warm-up/stable/decay schedule, accumulation, mixed precision, checkpoints, DDP.

One optimizer step consumes `tokens_per_step` tokens. They are drawn in one call,
`train_data.next_batch(micro_batch_size * accum)`, and split into `accum`
micro-batches, so the data a step sees does not depend on how it is split: a run
with micro-batches of 4 and 4 accumulation steps sees the same windows as one
with a single micro-batch of 16, and under DDP each rank takes its own slice of
the same draw (`TokenWindows(rank=, world_size=)`).

Run under `torchrun` for several processes (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node=2 -m refinery.model.train --train 'shards/train-*.arrow' \\
        --val 'shards/val-*.arrow' --vocab-size 8192 --out train/

Only rank 0 writes checkpoints, metrics and the plot.

`precision: auto` is bf16 on a GPU that has it; on a CPU it is whichever of bf16
autocast and fp32 runs a one-block copy of the model faster, measured at start-up
and cached per machine (`refinery.model.precision`). A `MixtureWindows` loader
(`refinery.storage.mixture`) draws by `mixture` and counts the tokens served; the
counts go to `tokens_seen_by_format.json` and the result.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from tqdm.auto import tqdm

from refinery.model.checkpoint import (
    find_checkpoint,
    load_train_state,
    load_weights,
    read_config,
    save_checkpoint,
)
from refinery.model.evaluate import evaluate_loss
from refinery.model.gpt import GPT, PRESETS, GPTConfig, config_from_preset
from refinery.model.plots import plot_loss_curve, read_metrics
from refinery.model.precision import Measure, PrecisionChoice, PrecisionProbe, decide_precision
from refinery.storage.atomic import atomic_write_text
from refinery.storage.mixture import MixtureWindows, write_tokens_seen
from refinery.storage.shards import TokenWindows

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for MFU. Matched as substrings of
# torch.cuda.get_device_name(), most specific first.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16
    ("T4", 65e12),  # fp16
]


def peak_flops(device: torch.device) -> float:
    """bf16 dense peak of one device, or 0.0 where unknown (CPUs: MFU is then reported as 0)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_FLOPS:
        if key in name:
            return peak
    return 0.0


# Keys added after the first release, left out of a config's serialization while at these defaults.
LATER_DEFAULTS: dict[str, Any] = {
    "init_from": "scratch", "early_stop_patience": "auto", "early_stop_min_delta": 0.0, "mixture": {}, "nproc": 1,
    "schedule": "cosine", "decay_frac": 0.2,  # checkpoints saved before `schedule` existed were cosine
}


AUTO = "auto"  # `preset: auto`: chosen per corpus and budget before training (refinery.model.sizing)


class TrainConfig(BaseModel):
    """Everything that shapes a run. Model-shape keys left None take the preset's value."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field(
        default="auto",
        description="model size: a key of refinery.model.gpt.PRESETS, or auto: the size predicted to reach the "
        "lowest loss on this corpus within max_time_s at this device's measured speed (refinery.model.sizing)",
    )
    seq_len: int | None = Field(default=None, ge=8, description="context length; the preset's when None")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per forward/backward, per process")
    tokens_per_step: int = Field(
        default=2048, ge=1, description="tokens per optimizer step, all processes together (2048: one micro-batch of 8x256)"
    )
    max_steps: int = Field(
        default=2000, ge=1,
        description="at most this many optimizer steps; with max_time_s the budget plans how many fit, and the "
        "learning-rate schedule ends there",
    )
    max_time_s: float | None = Field(
        default=160.0, gt=0,
        description="time budget: after a few steps the run plans how many steps fit and the schedule decays by then",
    )
    lr: float = Field(default=2e-3, gt=0)
    min_lr: float = Field(default=2e-4, ge=0, description="the learning rate the schedule ends at")
    schedule: Literal["wsd", "cosine"] = Field(
        default="wsd",
        description="wsd: warm-up, then lr held, then a linear decay to min_lr over the last decay_frac of the "
        "steps; cosine: warm-up, then a cosine decay to min_lr over the rest (docs/model.md says why wsd)",
    )
    decay_frac: float = Field(default=0.2, gt=0, le=1, description="wsd: the fraction of the steps spent decaying")
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global grad norm; None disables")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    eval_every: int = Field(
        default=50, ge=1, description="steps between validation runs (and one at the end)"
    )
    eval_batches: int | None = Field(
        default=8, ge=1,
        description="validation batches per evaluation during training (the eval stage has its own, eval.max_batches); None: all",
    )
    checkpoint_every: int = Field(
        default=100, ge=1, description="steps between checkpoints (and one at the end)"
    )
    early_stop_patience: int | Literal["auto"] | None = Field(
        default="auto",
        description="stop after this many validation runs in a row without a new best (by more than "
        "early_stop_min_delta), and report the best weights; None: no early stopping; auto: 2 when the corpus is "
        "small for the model (the training plan says so), else none",
    )
    early_stop_min_delta: float = Field(
        default=0.0, ge=0, description="how far (nats) a validation loss must fall below the best to count as one"
    )
    seed: int = 0
    peak_flops: float | None = Field(
        default=None, gt=0, description="per-device peak FLOP/s for MFU; by GPU name when None"
    )
    # Model overrides on top of the preset.
    n_layer: int | None = Field(default=None, ge=1)
    n_head: int | None = Field(default=None, ge=1)
    n_kv_head: int | None = Field(default=None, ge=1)
    d_model: int | None = Field(default=None, ge=2)
    ffn_hidden: int | None = Field(default=None, ge=1)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    init_from: str = Field(
        default="scratch",
        description="starting weights: scratch (random), last (this run root's previous train checkpoint) or "
        "models:/NAME/VERSION (or models:/NAME/latest); same model shape and tokenizer required",
    )

    mixture: dict[str, float] = Field(
        default_factory=dict,
        description="sampling weights of the training windows by document format or source-file glob, e.g. "
        "{code: 1, '*': 3}: each pattern's share of the windows (a document takes the first pattern matching "
        "its format or source); empty: the corpus' natural proportions",
    )
    nproc: int = Field(
        default=1, ge=1, le=1024,
        description="processes the train stage launches with torchrun (DDP): one per GPU, or gloo processes on CPU",
    )

    @field_validator("mixture")
    @classmethod
    def _valid_mixture(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()) or (value and not any(w > 0 for w in value.values())):
            raise ValueError(f"mixture weights must be >= 0 with at least one > 0, got {value}")
        return value

    @field_validator("init_from")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if value in ("scratch", "last") or (value.startswith("models:/") and len(value) > len("models:/")):
            return value
        raise ValueError(
            f"init_from must be scratch, last or models:/NAME/VERSION (or /latest), not {value!r}"
        )

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out keys added after the first release while they hold their defaults (`init_from`
        `scratch`, no early stopping), so configs (and the config hash of every train stage trained
        before the keys existed) stay what they were; any other value is kept."""
        data = handler(self)
        for key, default in LATER_DEFAULTS.items():
            if getattr(self, key) == default:
                data.pop(key, None)
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value != AUTO and value not in PRESETS:
            raise ValueError(f"unknown model preset {value!r}; choose auto or one of {sorted(PRESETS)}")
        return value

    def model_config_for(self, vocab_size: int) -> GPTConfig:
        if self.preset == AUTO:
            raise ValueError("train.preset is auto: resolve it first with refinery.model.sizing.resolve_preset, or pin a preset")
        keys = ("seq_len", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden", "dropout")
        return config_from_preset(self.preset, vocab_size, **{k: getattr(self, k) for k in keys})


class TrainResult(BaseModel):
    steps: int
    tokens_seen: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    mfu: float
    checkpoint_dir: Path
    loss_curve: Path
    metrics_file: Path
    num_params: int
    planned_steps: int = 0  # the schedule's length: max_steps, or what the time budget allows
    best_val_loss: float = math.nan  # the lowest validation loss of the run, and the step it was measured at
    best_step: int = 0
    stopped_early: bool = False  # early stopping (`early_stop_patience`) ended the run
    precision: str = ""  # what the run trained in (`precision: auto` resolved)
    precision_source: str = ""  # explicit, cuda, measured, cached or heuristic
    precision_timings_s: dict[str, float] = {}  # the measurement `auto` decided by, when it measured
    tokens_seen_by: dict[str, Any] = {}  # the loader's counts (a MixtureWindows loader), else empty


# ----------------------------------------------------------------------------- helpers


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """The learning rate at `step` of a schedule `total_steps` long (default `max_steps`).

    Linear warm-up to `lr`, then, by `schedule`: `wsd` (warm-up, stable, decay) holds `lr` and decays
    linearly to `min_lr` over the last `decay_frac` of the steps, reaching it at the last step; `cosine`
    decays from the warm-up's end. A schedule planned shorter than `max_steps` (the time budget allows
    fewer steps) keeps its warm-up to at most a fifth of it. A config without `schedule` (LoRA's) is cosine.
    """
    total = total_steps or cfg.max_steps
    warmup = cfg.warmup_steps if total >= cfg.max_steps else min(cfg.warmup_steps, max(1, total // 5))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if getattr(cfg, "schedule", "cosine") == "wsd":
        decay_steps = max(1, round(cfg.decay_frac * total))
        into = step - (total - decay_steps) + 1  # 1 at the decay's first step, decay_steps at the last
        return cfg.lr if into <= 0 else cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, into / decay_steps)
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AMX tiles for bf16 matmuls (`amx_bf16`, Sapphire Rapids and later).

    Only the guess `precision: auto` falls back on when it has no shapes to time
    (`refinery.model.precision` measures otherwise). Without AMX, bf16 training was
    slower than fp32 on the CPUs measured: emulated on AVX2 (~0.3 GFLOP/s against ~21
    in fp32 on one core), and even with AVX512-BF16 dot products a `cpu-small` step ran
    at 0.56x its fp32 speed (4,876 against 8,766 tokens/s on two Xeon cores).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "amx_bf16" in cpuinfo.split()


def resolve_precision(
    precision: str, device: torch.device, probe: PrecisionProbe | None = None, measure: Measure | None = None
) -> str:
    """'auto': bf16 on GPUs that have it, else fp16 with a gradient scaler; on a CPU the faster of
    bf16 autocast and fp32 for `probe`'s shapes, measured once per machine (`refinery.model.precision`),
    or, without a probe, bf16 only where the CPU has AMX bf16 tiles. Explicit settings are kept."""
    return decide_precision(precision, device, probe, measure).precision


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and the embedding), none on norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


BEST_DIR = "best"  # beside `checkpoint/`: the weights of the best validation loss, with early stopping on

CALIBRATION_STEPS = 5  # steps timed before the time budget is turned into a planned number of steps


REPLANS = {"wsd": 3, "cosine": 2}  # plans after the first, by schedule (see `replan_step`)


def replan_step(cfg: TrainConfig, planned: int, done: int = 0) -> int:
    """The step at which a run re-measures its speed and plans again, after `done` re-plans.

    First at the end of the warm-up of a schedule `planned` long (at least twice the first
    calibration's steps): the decay has not started, so a new length changes no learning rate
    already used. Then at about a quarter of the schedule, from the steady steps since: there the
    `wsd` schedule is still flat (a new length changes nothing used) and the cosine near its top.
    A `wsd` run plans once more, a step before its decay starts, from the steps since: the rate is
    still flat, and the 5% margin is then taken of the last fifth of the budget only, so the run
    ends closer to its deadline.
    """
    warmup = cfg.warmup_steps if planned >= cfg.max_steps else min(cfg.warmup_steps, max(1, planned // 5))
    first = max(2 * CALIBRATION_STEPS, warmup)
    second = max(first + 20, planned // 4)
    if done <= 1:
        return first if done == 0 else second
    return max(second + 20, planned - max(1, round(cfg.decay_frac * planned)) - 1)


def plan_steps(
    cfg: TrainConfig, step: int, elapsed_s: float, steps_timed: int, seq_len: int, timed_s: float | None = None
) -> int:
    """How many steps in all fit the time budget, `elapsed_s` of it spent, from the time the last
    `steps_timed` steps took (`timed_s`; all of `elapsed_s` when None).

    Evaluations are counted in: a validation batch is a forward pass only, about a third of a
    training token's cost. A 5% margin covers noise; the answer is at most `max_steps`.
    """
    if cfg.max_time_s is None or steps_timed <= 0:
        return cfg.max_steps
    per_step = (elapsed_s if timed_s is None else timed_s) / steps_timed
    eval_tokens = (cfg.eval_batches or 64) * cfg.micro_batch_size * seq_len
    per_step *= 1.0 + eval_tokens / (3.0 * cfg.tokens_per_step * cfg.eval_every)
    remaining = cfg.max_time_s - elapsed_s
    return max(step + 1, min(cfg.max_steps, step + int(0.95 * remaining / per_step)))


def _out_of_time(max_time_s: float | None, t_start: float, world_size: int, device: torch.device) -> bool:
    """Whether the time budget is spent; under DDP rank 0 decides for all, so no rank waits alone."""
    if max_time_s is None:
        return False
    over = torch.tensor([float(time.perf_counter() - t_start > max_time_s)], device=device)
    if world_size > 1:
        dist.broadcast(over, src=0)
    return bool(over.item())


def _compatible(saved: dict[str, Any], model_cfg: GPTConfig, cfg: TrainConfig) -> str | None:
    """Why a saved checkpoint cannot be resumed by this run, or None when it can."""
    if saved.get("model") != model_cfg.model_dump():
        return "the model shape differs"
    train_cfg = saved.get("train_config", {})
    for key in ("tokens_per_step", "seed", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "mixture",
                "schedule", "decay_frac"):
        saved_value = train_cfg.get(key, LATER_DEFAULTS.get(key))
        if saved_value != getattr(cfg, key):
            return f"{key} differs ({saved_value} saved, {getattr(cfg, key)} now)"
    return None


def agreed_precision(
    cfg: TrainConfig, device: torch.device, model_cfg: GPTConfig, world_size: int, master: bool
) -> PrecisionChoice:
    """The run's precision; under DDP on CPU rank 0 measures alone (the others wait) and its choice holds for all."""
    probe = PrecisionProbe.for_model(model_cfg, cfg.micro_batch_size)
    if world_size == 1 or cfg.precision != "auto" or device.type == "cuda":
        return decide_precision(cfg.precision, device, probe)
    choice = decide_precision(cfg.precision, device, probe) if master else None
    shared = torch.zeros(3, dtype=torch.float64)
    if choice is not None:
        shared[0] = float(choice.precision == "bf16")
        shared[1:] = torch.tensor([choice.timings_s.get("bf16", math.nan), choice.timings_s.get("fp32", math.nan)])
    dist.broadcast(shared, src=0)
    if choice is not None:
        return choice
    timings = {"bf16": float(shared[1]), "fp32": float(shared[2])}
    return PrecisionChoice("bf16" if shared[0] else "fp32", "rank 0", {k: v for k, v in timings.items() if v == v})


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig,
    vocab_size: int,
    train_data: TokenWindows,
    val_data: TokenWindows,
    out_dir: Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    bytes_per_token: float | None = None,
    init_weights: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume) a model in `out_dir`; see the module docstring for the data split.

    `bytes_per_token` (UTF-8 bytes of the validation text per token), when given,
    adds `val_bpb` (bits per byte) to the metrics at each evaluation.
    `init_weights`, a checkpoint folder of the same model shape, warm-starts a run
    that has no checkpoint of its own to resume (continued training): its weights
    replace the random initialisation, while the optimizer, the LR schedule
    (warm-up, then the decay by `max_steps`) and the data order start afresh.
    `meta` is added to every checkpoint's config.json (e.g. the tokenizer's digest).
    """
    out_dir = Path(out_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    started_dist = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        started_dist = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    master = rank == 0
    try:
        return _train(
            cfg,
            vocab_size,
            train_data,
            val_data,
            out_dir,
            on_metrics,
            progress and master,
            bytes_per_token,
            rank,
            world_size,
            init_weights,
            meta or {},
        )
    finally:
        if started_dist:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    vocab_size: int,
    train_data: TokenWindows,
    val_data: TokenWindows,
    out_dir: Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None,
    progress: bool,
    bytes_per_token: float | None,
    rank: int,
    world_size: int,
    init_weights: Path | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> TrainResult:
    master = rank == 0
    if cfg.early_stop_patience == AUTO:  # the stage resolves it from its plan; called directly, auto is off
        cfg = cfg.model_copy(update={"early_stop_patience": None})
    device = resolve_device(cfg.device)
    model_cfg = cfg.model_config_for(vocab_size)
    choice = agreed_precision(cfg, device, model_cfg, world_size, master)
    precision = choice.precision
    if master and choice.timings_s:
        tqdm.write(f"train: {choice.describe()}")
    seq_len = model_cfg.seq_len
    for name, data in (("train", train_data), ("val", val_data)):
        if data.seq_len != seq_len:
            raise ValueError(
                f"{name}_data windows are {data.seq_len} tokens but the model's seq_len is {seq_len}; "
                f"build TokenWindows with seq_len={seq_len}"
            )
    if world_size > 1 and (train_data.world_size != world_size or train_data.rank != rank):
        raise ValueError(
            f"train_data was built for rank {train_data.rank}/{train_data.world_size}, this process is "
            f"{rank}/{world_size}; pass rank= and world_size= to TokenWindows"
        )
    tokens_per_micro = cfg.micro_batch_size * seq_len * world_size
    accum = cfg.tokens_per_step // tokens_per_micro
    if accum < 1 or cfg.tokens_per_step % tokens_per_micro:
        raise ValueError(
            f"tokens_per_step ({cfg.tokens_per_step}) must be a positive multiple of micro_batch_size x "
            f"seq_len x processes = {tokens_per_micro}"
        )

    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_cfg).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(raw_model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    ckpt_dir = out_dir / "checkpoint"
    best_dir = out_dir / BEST_DIR
    metrics_file = out_dir / "metrics.jsonl"
    loss_curve = out_dir / "loss_curve.png"
    start_step, tokens_seen, history = 0, 0, []
    planned: int | None = None  # the steps the time budget allows, once measured (kept across a resume)
    # Early stopping: the best validation loss so far, its step, the evaluations since (all kept across a resume).
    best_val, best_step, evals_since_best, stopped_early = math.inf, 0, 0, False
    found = find_checkpoint(ckpt_dir, need_state=True)
    reason = _compatible(read_config(found), model_cfg, cfg) if found else "no checkpoint"
    if found and reason is None:
        load_weights(raw_model, found)
        state = load_train_state(found, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        train_data.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        start_step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        planned = state.get("planned_steps")
        best_val = float(state.get("best_val_loss", math.inf))
        best_step = int(state.get("best_step", 0))
        evals_since_best = int(state.get("evals_since_best", 0))
        # A run that stopped early is finished, unless it is now resumed with early stopping off.
        stopped_early = bool(state.get("stopped_early", False)) and cfg.early_stop_patience is not None
        if metrics_file.exists():
            history = [r for r in read_metrics(metrics_file) if r["step"] <= start_step]
    else:
        if found and master:
            tqdm.write(f"not resuming from {found}: {reason}; starting afresh")
        if init_weights is not None:
            load_weights(raw_model, Path(init_weights))  # continued training: warm start, fresh optimizer
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:  # a fresh run: another run's best weights mean nothing here
            for stale in (best_dir, best_dir.with_name(BEST_DIR + ".next"), best_dir.with_name(BEST_DIR + ".prev")):
                shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(metrics_file, "".join(json.dumps(r) + "\n" for r in history))

    model: torch.nn.Module = raw_model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        model = torch.compile(model)
    peak = (cfg.peak_flops or peak_flops(device)) * world_size
    flops_per_token = raw_model.flops_per_token(seq_len)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype))
        if autocast_dtype
        else contextlib.nullcontext
    )

    def evaluate() -> float:
        return evaluate_loss(raw_model, val_data, cfg.micro_batch_size, cfg.eval_batches, autocast_dtype)

    def val_metrics(loss: float) -> dict[str, float]:
        if bytes_per_token:
            return {"val_loss": loss, "val_bpb": loss / (bytes_per_token * math.log(2))}
        return {"val_loss": loss}

    def checkpoint_meta(step: int) -> dict[str, Any]:
        return {
            **(extra_meta or {}),
            "step": step,
            "tokens_seen": tokens_seen,
            "precision": precision,
            "train_config": cfg.model_dump(),
            "vocab_size": vocab_size,
        }

    def note_validation(step: int, loss: float) -> None:
        """Keep the best validation loss (and, with early stopping on, its weights in `best/`)."""
        nonlocal best_val, best_step, evals_since_best
        if loss < best_val - cfg.early_stop_min_delta:
            best_val, best_step, evals_since_best = loss, step, 0
            if master and cfg.early_stop_patience is not None:
                save_checkpoint(best_dir, raw_model, None, {**checkpoint_meta(step), "val_loss": loss})
        else:
            evals_since_best += 1

    def should_stop() -> bool:
        """Whether early stopping ends the run now; under DDP rank 0 decides for all."""
        if cfg.early_stop_patience is None:
            return False
        stop = torch.tensor([float(evals_since_best >= cfg.early_stop_patience)], device=device)
        if world_size > 1:
            dist.broadcast(stop, src=0)
        return bool(stop.item())

    def checkpoint(step: int) -> None:
        if not master:
            return
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": _rng_state(),
            "loader": train_data.state_dict(),
            "planned_steps": planned,
            "best_val_loss": best_val,
            "best_step": best_step,
            "evals_since_best": evals_since_best,
            "stopped_early": stopped_early,
        }
        save_checkpoint(ckpt_dir, raw_model, state, checkpoint_meta(step))

    log = open(metrics_file, "a") if master else None  # noqa: SIM115 - appended line by line, closed below
    total = planned or cfg.max_steps
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not progress)
    last: dict[str, float] = history[-1] if history else {}
    train_loss, val_loss = float(last.get("loss", math.nan)), float(last.get("val_loss", math.nan))
    for r in reversed(history):
        if "val_loss" in r:
            val_loss = r["val_loss"]
            break
    rates: list[float] = []
    step, evaluated_at = start_step, start_step if not math.isnan(val_loss) else -1
    calibrated_at: tuple[int, float] | None = None  # (step, time) of this process's last plan, while it re-plans
    replans = 0
    t_start = time.perf_counter()
    model.train()
    try:
        while step < total and not stopped_early and not _out_of_time(cfg.max_time_s, t_start, world_size, device):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = train_data.next_batch(cfg.micro_batch_size * accum)
            xs = torch.from_numpy(x).to(device, non_blocking=True).split(cfg.micro_batch_size)
            ys = torch.from_numpy(y).to(device, non_blocking=True).split(cfg.micro_batch_size)
            loss_sum = torch.zeros((), device=device)
            for i in range(accum):
                # Under DDP, gradients are all-reduced once, on the last micro-batch.
                sync = contextlib.nullcontext() if (i == accum - 1 or world_size == 1) else model.no_sync()
                with sync:
                    with autocast():
                        _, loss = model(xs[i], ys[i])
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if world_size > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            train_loss = float(loss_sum) / accum
            step += 1
            tokens_seen += cfg.tokens_per_step
            dt = time.perf_counter() - t0
            tokens_per_s = cfg.tokens_per_step / dt
            rates.append(tokens_per_s)
            metrics = {
                "loss": train_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "flops_per_s": flops_per_token * tokens_per_s,
                "mfu": flops_per_token * tokens_per_s / peak if peak else 0.0,
            }
            # The time budget becomes a number of steps: first from the first steps (which pay for warm-up
            # allocations, so it errs short), then again from the steady steps at the end of the warm-up.
            calibrate = planned is None and step - start_step == CALIBRATION_STEPS
            replan = calibrated_at is not None and step == replan_step(cfg, planned or total, replans)
            if cfg.max_time_s is not None and (calibrate or replan):
                now = time.perf_counter()
                if calibrate:
                    planned = plan_steps(cfg, step, now - t_start, step - start_step, seq_len)
                else:
                    planned = plan_steps(cfg, step, now - t_start, step - calibrated_at[0], seq_len,
                                         timed_s=now - calibrated_at[1])  # fmt: skip
                    replans += 1
                calibrated_at = (step, now) if replans < REPLANS[cfg.schedule] else None
                if world_size > 1:  # rank 0's measurement decides for all
                    shared = torch.tensor([planned], device=device)
                    dist.broadcast(shared, src=0)
                    planned = int(shared.item())
                if master and (planned != total or replan):
                    tqdm.write(
                        f"train: the time budget (max_time_s={cfg.max_time_s:g}) fits {planned} of max_steps="
                        f"{cfg.max_steps} steps at the speed measured "
                        f"{('after the warm-up' if replans == 1 else 'since') if replan else 'so far'}; "
                        f"the learning-rate schedule ends at step {planned}"
                    )
                total = planned
                bar.total = total
                bar.refresh()
            if step % cfg.eval_every == 0 or step == total:
                val_loss, evaluated_at = evaluate(), step
                metrics.update(val_metrics(val_loss))
                note_validation(step, val_loss)
                stopped_early = step < total and should_stop()
            if master:
                if on_metrics is not None:
                    on_metrics(step, metrics)
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 and step < total and not stopped_early:
                checkpoint(step)
        if stopped_early and step > start_step and master:
            tqdm.write(
                f"train: early stop at step {step} of {total}: {cfg.early_stop_patience} validation run(s) without "
                f"a new best; the best validation loss, {best_val:.4f} at step {best_step}, is kept"
            )
        if step < total and not stopped_early and master:
            tqdm.write(f"train: warning: the time budget ran out at step {step} of the planned {total}; "
                       "the learning rate had not finished decaying (raise train.max_time_s)")
        if evaluated_at != step:  # stopped early by the time budget: measure where it stopped
            val_loss = evaluate()
            note_validation(step, val_loss)
            if master:
                extra = val_metrics(val_loss)
                if on_metrics is not None:
                    on_metrics(step, extra)
                log.write(json.dumps({"step": step, **extra}) + "\n")
        if step > start_step or not found:
            checkpoint(step)
        if master and isinstance(train_data, MixtureWindows):
            write_tokens_seen(out_dir, train_data.tokens_seen())
    finally:
        bar.close()
        if log is not None:
            log.close()
    if master:
        plot_loss_curve(
            metrics_file, loss_curve, title=f"{cfg.preset}, {raw_model.num_params() / 1e6:.1f}M parameters"
        )
    steady = rates[1:] or rates  # the first step pays for warm-up allocations
    reported = ckpt_dir
    if cfg.early_stop_patience is not None and best_step != step and best_val < val_loss:
        found_best = find_checkpoint(best_dir)
        saved_step = read_config(found_best).get("step") if found_best else None
        if found_best is not None and saved_step == best_step:
            reported = found_best
        elif master:
            tqdm.write(f"train: warning: the best weights (step {best_step}) are not in {best_dir} (found step "
                       f"{saved_step}); reporting the final checkpoint instead")
    tps = sum(steady) / len(steady) if steady else 0.0
    return TrainResult(
        steps=step,
        tokens_seen=tokens_seen,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens_per_s=tps,
        mfu=flops_per_token * tps / peak if peak else 0.0,
        checkpoint_dir=reported,
        loss_curve=loss_curve,
        metrics_file=metrics_file,
        num_params=raw_model.num_params(),
        planned_steps=total,
        best_val_loss=best_val if best_val < math.inf else math.nan,
        best_step=best_step,
        stopped_early=stopped_early,
        precision=precision,
        precision_source=choice.source,
        precision_timings_s=choice.timings_s,
        tokens_seen_by=train_data.tokens_seen() if isinstance(train_data, MixtureWindows) else {},
    )


# ----------------------------------------------------------------------------- command line (torchrun)

METRICS_PREFIX = "refinery-metrics "  # `--report-metrics` lines: the prefix, the step, the metrics as JSON


def config_from_args(config: Path | None, overrides: list[str]) -> TrainConfig:
    """The TrainConfig of a torchrun command line: the `--config` file's keys, then `--set KEY=VALUE`.

    Values parse as YAML with the same parser as `refinery run --set train.KEY=VALUE`,
    so a key means the same thing on both command lines. The file is read as JSON
    (what `TrainConfig.model_dump_json` writes) and, failing that, as YAML. Raises
    ConfigError (a ValueError) on a malformed item and pydantic's ValidationError
    on an unknown key or a bad value.
    """
    import yaml

    from refinery.overrides import ConfigError, apply_overrides

    fields: Any = {}
    if config is not None:
        text = config.read_text(encoding="utf-8")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError:
            try:
                fields = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{config} is neither JSON nor YAML: {exc}") from exc
    if not isinstance(fields, dict | None):
        raise ConfigError(f"{config} must hold a mapping of TrainConfig keys")
    return TrainConfig(**apply_overrides(fields or {}, overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train the Refinery model on token shards (works under torchrun)."
    )
    parser.add_argument("--train", nargs="+", required=True, help="train shard files or glob patterns")
    parser.add_argument("--val", nargs="+", required=True, help="validation shard files or glob patterns")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoint, metrics, plot)")
    parser.add_argument("--config", type=Path, help="JSON or YAML file with TrainConfig keys")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one TrainConfig key; the value parses as YAML (3e-4, true, null)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--stats", type=Path,
        help="the shards stage's stats.parquet (document formats and sources, for train.mixture and the count "
        "of tokens seen); default: beside the first train shard",
    )  # fmt: skip
    parser.add_argument("--init-weights", type=Path, help="checkpoint folder to warm-start from (continued training)")
    parser.add_argument("--meta", default="{}", help="JSON object added to every checkpoint's config.json")
    parser.add_argument(
        "--report-metrics", action="store_true",
        help=f"print each step's metrics on stdout as '{METRICS_PREFIX}STEP JSON' lines (for a parent process)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    try:
        cfg = config_from_args(args.config, args.set)
    except ValueError as exc:  # ConfigError and pydantic's ValidationError both are
        parser.error(str(exc))

    def expand(patterns: list[str]) -> list[str]:
        paths = sorted(p for pattern in patterns for p in (glob.glob(pattern) or [pattern]))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            parser.error(f"shard files not found: {missing}")
        return paths

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    seq_len = cfg.model_config_for(args.vocab_size).seq_len
    train_data = MixtureWindows(
        expand(args.train), seq_len, seed=cfg.seed, rank=rank, world_size=world_size, mixture=cfg.mixture,
        stats_file=args.stats,
    )  # fmt: skip
    val_data = TokenWindows(expand(args.val), seq_len, seed=cfg.seed)

    def report(step: int, metrics: dict[str, float]) -> None:
        print(f"{METRICS_PREFIX}{step} {json.dumps(metrics)}", flush=True)

    result = train(
        cfg, args.vocab_size, train_data, val_data, args.out, progress=not args.no_progress,
        on_metrics=report if args.report_metrics else None, init_weights=args.init_weights,
        meta=json.loads(args.meta),
    )  # fmt: skip
    if rank == 0:
        print(result.model_dump_json(), flush=True)


if __name__ == "__main__":
    main()
