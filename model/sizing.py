"""`train.preset: auto`: the model size that should reach the lowest loss on this corpus within this budget.

A bigger model learns more per token but sees fewer tokens in the same time, and a small
corpus seen many times over stops teaching anything new. Both trade-offs have published
fits, and the choice here is the candidate they predict best:

- Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models" (Chinchilla),
  approach 3: L(N, D) = E + A / N^alpha + B / D^beta, whose optimum at a fixed compute
  is about 20 tokens per parameter.
- Muennighoff et al. (2023), "Scaling Data-Constrained Language Models": tokens seen
  again are worth less (effective data D' = U + U R* (1 - e^(-R/R*)) for R repetitions,
  R* = 15.4), and so are parameters beyond what the unique data supports (N' from the
  compute-optimal size for U, with R*_N = 5.3).

With a time budget (`max_time_s`), each candidate's tokens come from its own measured
training speed on this device (a few timed steps, counted inside the budget), so the
candidate sizes compete at equal compute. Without one, every candidate would see
`max_steps x tokens_per_step` tokens and the rule is the plain one: the largest candidate
with at least 20 tokens per parameter, else the smallest. The fits were made on models far
larger than the CPU presets, so they rank candidates rather than predict losses; on the
bundled sample the ranking agreed with trained runs (docs/model.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Chinchilla's approach-3 fit (Hoffmann et al. 2022, eq. 10) and its compute-optimal ratio.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAM = 20.0
# Muennighoff et al. (2023): how fast repeated data (R*_D) and excess parameters (R*_N) lose their value.
R_STAR_D, R_STAR_N = 15.4, 5.3
# The presets `auto` chooses among, by device type, smallest first.
LADDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu-tiny", "cpu-small", "cpu-base"),
    "cuda": ("cpu-base", "gpt2-mini", "gpt2-small", "350m"),
}
TIMED_STEPS = 2  # timed optimizer steps per candidate, after one untimed warm-up step

MeasureSpeed = Callable[[str], float]  # preset -> training tokens per second on this device


def effective_data(seen: float, unique: float) -> float:
    """Tokens worth of fresh data that `seen` tokens drawn from `unique` distinct ones are (Muennighoff D')."""
    if unique <= 0 or seen <= unique:
        return seen
    repeats = seen / unique - 1.0
    return unique + unique * R_STAR_D * (1.0 - math.exp(-repeats / R_STAR_D))


def effective_params(params: float, unique: float) -> float:
    """Parameters worth of a model of `params` trained on `unique` distinct tokens (Muennighoff N')."""
    useful = max(1.0, unique / TOKENS_PER_PARAM)
    if params <= useful:
        return params
    excess = params / useful - 1.0
    return useful + useful * R_STAR_N * (1.0 - math.exp(-excess / R_STAR_N))


def predicted_loss(params: float, seen: float, unique: float) -> float:
    """Chinchilla's loss for `params` trained on `seen` tokens of a corpus of `unique`, repetition discounted."""
    n, d = effective_params(params, unique), effective_data(seen, unique)
    return E + A / max(n, 1.0) ** ALPHA + B / max(d, 1.0) ** BETA


@dataclass(frozen=True)
class Candidate:
    preset: str
    params: int
    tokens: int  # tokens it would train on: what its speed allows within the budget, at most max_steps' worth
    tokens_per_s: float | None  # measured; None without a time budget
    predicted: float  # `predicted_loss`; lower is better


@dataclass(frozen=True)
class SizeChoice:
    """The preset `auto` resolved to, and the candidates it was chosen from (for the plan and MLflow)."""

    preset: str
    rule: str
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    seconds: float = 0.0  # spent measuring speeds

    def describe(self) -> str:
        rows = ", ".join(
            f"{c.preset} {c.params / 1e6:.1f}M params"
            + (f" {c.tokens_per_s:,.0f} tok/s" if c.tokens_per_s else "")
            + f" -> {c.tokens:,} tokens ({c.tokens / max(1, c.params):.2f}/param)"
            for c in self.candidates
        )
        return f"preset auto: {self.preset} ({self.rule}; candidates: {rows}; sizing took {self.seconds:.1f} s)"

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "rule": self.rule, "seconds": self.seconds,
                "candidates": [c.__dict__ for c in self.candidates]}  # fmt: skip


def choose(
    ladder: Sequence[str],
    params: dict[str, int],
    unique_tokens: int,
    max_tokens: int,
    budget_s: float | None,
    speed: MeasureSpeed | None = None,
) -> SizeChoice:
    """Pick from `ladder` (smallest first) for a corpus of `unique_tokens` training tokens.

    `max_tokens` is what `max_steps` allows; with `budget_s` each candidate's tokens are
    also bounded by `speed(preset) * budget_s`, and the lowest `predicted_loss` wins. Without
    a budget: the largest candidate with `TOKENS_PER_PARAM` tokens per parameter, else the smallest.
    """
    t0 = time.perf_counter()
    if budget_s is None or speed is None:
        rows = tuple(Candidate(p, params[p], max_tokens, None, predicted_loss(params[p], max_tokens, unique_tokens))
                     for p in ladder)  # fmt: skip
        fitting = [c for c in rows if c.tokens >= TOKENS_PER_PARAM * c.params]
        pick = fitting[-1] if fitting else rows[0]
        rule = (f"the largest with >= {TOKENS_PER_PARAM:.0f} tokens per parameter in max_steps" if fitting
                else f"none has {TOKENS_PER_PARAM:.0f} tokens per parameter in max_steps: the smallest")  # fmt: skip
        return SizeChoice(pick.preset, rule, rows, 0.0)
    rows_list: list[Candidate] = []
    for preset in ladder:
        tps = speed(preset)
        tokens = int(min(max_tokens, tps * budget_s))
        rows_list.append(Candidate(preset, params[preset], tokens, tps,
                                   predicted_loss(params[preset], tokens, unique_tokens)))  # fmt: skip
        # A candidate worse than a smaller one is as far as it goes: a bigger one would be slower still.
        if len(rows_list) > 1 and rows_list[-1].predicted > rows_list[-2].predicted:
            break
    best = min(rows_list, key=lambda c: c.predicted)
    rule = "lowest predicted loss (Chinchilla fit, repetition discounted) at the measured speed within the budget"
    return SizeChoice(best.preset, rule, tuple(rows_list), time.perf_counter() - t0)


def measure_tokens_per_s(
    model_cfg: Any, micro_batch_size: int, device: torch.device, precision: str, steps: int = TIMED_STEPS
) -> float:
    """Training tokens per second of `model_cfg` here: one warm-up step, then the fastest of `steps` AdamW steps."""
    from refinery.model.gpt import GPT

    with torch.random.fork_rng(devices=[]):  # the run's own seeding stays untouched
        torch.manual_seed(0)
        model = GPT(model_cfg).to(device)
        x = torch.randint(0, model_cfg.vocab_size, (micro_batch_size, model_cfg.seq_len + 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    best = math.inf
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    del model, optimizer
    return micro_batch_size * model_cfg.seq_len / best


def batch_fits(model_cfg: Any, micro_batch_size: int, tokens_per_step: int, world_size: int) -> bool:
    """Whether `tokens_per_step` is a whole number of micro-batches of this model's sequences on every process."""
    per_micro = micro_batch_size * model_cfg.seq_len * world_size
    return tokens_per_step % per_micro == 0 and tokens_per_step >= per_micro


def resolve_preset(cfg: Any, vocab_size: int, train_tokens: int, world_size: int = 1) -> tuple[Any, SizeChoice | None]:
    """`cfg` with `preset: auto` replaced by the chosen preset (and the time spent choosing taken off
    `max_time_s`), and the choice; a pinned preset comes back as it is, with None.

    Candidates are the device's `LADDERS` entry, less those whose sequences do not divide
    `tokens_per_step` (a GPU run at the default 2,048 tokens per step keeps only the 256-token
    presets; raise `tokens_per_step` for the others).
    """
    from refinery.model.gpt import GPT, config_from_preset
    from refinery.model.precision import PrecisionProbe, decide_precision
    from refinery.model.train import AUTO, resolve_device

    if cfg.preset != AUTO:
        return cfg, None
    device = resolve_device(cfg.device)
    shape = {k: getattr(cfg, k) for k in ("seq_len", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden")}
    configs = {}
    for preset in LADDERS["cuda" if device.type == "cuda" else "cpu"]:
        try:
            model_cfg = config_from_preset(preset, vocab_size, **shape)
        except ValueError:  # an override that does not fit this preset (e.g. n_head against its width)
            continue
        if batch_fits(model_cfg, cfg.micro_batch_size, cfg.tokens_per_step, world_size):
            configs[preset] = model_cfg
    if not configs:
        raise ValueError(
            f"train.preset auto: no candidate preset fits tokens_per_step={cfg.tokens_per_step} with "
            f"micro_batch_size={cfg.micro_batch_size} on {world_size} process(es); pin train.preset or change them"
        )
    with torch.device("meta"):
        params = {p: GPT(c).num_params() for p, c in configs.items()}

    def speed(preset: str) -> float:
        model_cfg = configs[preset]
        probe = PrecisionProbe.for_model(model_cfg, cfg.micro_batch_size)
        precision = decide_precision(cfg.precision, device, probe).precision
        return world_size * measure_tokens_per_s(model_cfg, cfg.micro_batch_size, device, precision)

    t0 = time.perf_counter()
    choice = choose(list(configs), params, train_tokens, cfg.max_steps * cfg.tokens_per_step, cfg.max_time_s,
                    speed if cfg.max_time_s else None)  # fmt: skip
    spent = time.perf_counter() - t0
    choice = SizeChoice(choice.preset, choice.rule, choice.candidates, spent)
    update: dict[str, Any] = {"preset": choice.preset}
    if cfg.max_time_s is not None:
        update["max_time_s"] = max(1.0, cfg.max_time_s - spent)
    return cfg.model_copy(update=update), choice
