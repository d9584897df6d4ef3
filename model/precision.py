"""`precision: auto` decided by measurement: bf16 autocast or fp32, whichever trains this model faster here.

On a GPU the answer is known (bf16 where the GPU has it, else fp16 with a gradient
scaler). On a CPU it is not: bf16 matmuls are emulated on some CPUs and run on
dedicated units (AMX, AVX512-BF16, or oneDNN's AVX2 kernels) on others, and the
ratio moves with torch's version and with the matrix shapes. So the run times a
forward and backward pass of a one-block copy of its own model (the real width,
MLP, vocabulary, micro-batch and sequence length) under both precisions, after a
warm-up, and keeps the faster. The answer is cached per machine in
`$XDG_CACHE_HOME/refinery/precision.json` (else `~/.cache/refinery/`), keyed by the
CPU model, the torch version, the thread count and the shapes, so later runs start
at once; `REFINERY_PRECISION_CACHE=off` measures every time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CACHE_ENV = "REFINERY_PRECISION_CACHE"  # "off" (or 0/false/no): neither read nor write the cache
CACHE_FILE = "precision.json"
WARMUP = 1  # untimed passes per precision: allocator, oneDNN kernel selection, thread pool
REPEATS = 3  # at most this many timed passes per precision, interleaved; the fastest of each counts
CLEAR_RATIO = 1.5  # after a timed round, one precision this much faster than the other settles it
# A gap this wide already in the warm-up pass, with the slower pass this long (one-time costs can't explain
# it), settles the choice: a second pass of emulated bf16 would only cost seconds more.
WARMUP_CLEAR_RATIO, WARMUP_CLEAR_S = 4.0, 1.0
PROBE_TOKENS = 512  # the probe's batch is the run's micro-batch, cut to about this many tokens


@dataclass(frozen=True)
class PrecisionProbe:
    """The shapes a training step multiplies: what `precision: auto` times on a CPU."""

    d_model: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    vocab_size: int
    seq_len: int
    micro_batch_size: int

    @classmethod
    def for_model(cls, model_cfg: object, micro_batch_size: int, seq_len: int | None = None) -> PrecisionProbe:
        """The probe of a `GPTConfig` trained with `micro_batch_size` sequences of `seq_len` (its own by default)."""
        return cls(
            d_model=model_cfg.d_model, n_head=model_cfg.n_head, n_kv_head=model_cfg.n_kv_head,  # type: ignore[attr-defined]
            ffn_hidden=model_cfg.ffn_hidden, vocab_size=model_cfg.vocab_size,  # type: ignore[attr-defined]
            seq_len=seq_len or model_cfg.seq_len, micro_batch_size=micro_batch_size,  # type: ignore[attr-defined]
        )  # fmt: skip


# Seconds per probed forward+backward pass, by precision ("bf16", "fp32").
Measure = Callable[[PrecisionProbe, torch.device], dict[str, float]]


@dataclass
class PrecisionChoice:
    """What a run trains in, and why: `explicit`, `cuda`, `measured`, `cached` or `heuristic`."""

    precision: str
    source: str
    timings_s: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.timings_s:
            return f"precision {self.precision} ({self.source})"
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(self.timings_s.items()))
        return f"precision auto: {self.precision} ({self.source}; one-block forward+backward: {times})"


# CPU features that decide whether bf16 matmuls run natively or are emulated (x86 and Arm names). Two
# machines can share a model name ("AMD EPYC" in many VMs) and differ here by an order of magnitude.
BF16_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
                 "asimd", "bf16", "sve", "sve2", "sme")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for the cache key."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features(cpuinfo: str | None = None) -> str:
    """The CPU's features among `BF16_FEATURES` (x86 `flags`, Arm `Features`), for the cache key."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return "+".join(f for f in BF16_FEATURES if f in present) or "none"
    return "unknown"


def cache_file() -> Path | None:
    """Where measured choices are kept, or None when `REFINERY_PRECISION_CACHE` turns the cache off."""
    if os.environ.get(CACHE_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "refinery" / CACHE_FILE


def cache_key(probe: PrecisionProbe, device: torch.device) -> str:
    """Everything the answer depends on: the CPU and its features, torch's version, its threads and the shapes."""
    shapes = ",".join(f"{k}={v}" for k, v in asdict(probe).items())
    cpu = f"{cpu_model()}|{cpu_features()}"
    return f"{device.type}|{cpu}|torch {torch.__version__}|threads {torch.get_num_threads()}|{shapes}"


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Add one entry; a cache that can't be written costs a measurement next time, never the run."""
    from refinery.storage.atomic import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**_read_cache(path), key: entry})
    except OSError:
        pass


def time_one_block(probe: PrecisionProbe, device: torch.device) -> dict[str, float]:
    """Seconds per forward+backward of a one-block model of the probe's shapes, in bf16 autocast and fp32.

    The block, embedding and output layer are the real ones (attention included, whose
    backward moves with the precision too), over the run's sequence length and micro-batch
    (cut to about `PROBE_TOKENS` tokens: the ratio, not the time, is what decides). The two
    precisions are timed interleaved, so a busy spell of a shared machine slows both alike;
    each keeps its fastest pass, and a gap of `CLEAR_RATIO` ends the timing early (of
    `WARMUP_CLEAR_RATIO` already in the warm-up: bf16 emulated in software is many times slower,
    and a pass of it can take seconds).
    """
    from refinery.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=probe.vocab_size, seq_len=probe.seq_len, n_layer=1, n_head=probe.n_head,
        n_kv_head=probe.n_kv_head, d_model=probe.d_model, ffn_hidden=probe.ffn_hidden, dropout=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the run's own seeding stays untouched
        model = GPT(cfg).to(device)
    batch = max(1, min(probe.micro_batch_size, PROBE_TOKENS // probe.seq_len))
    x = torch.randint(0, probe.vocab_size, (batch, probe.seq_len), generator=generator).to(device)

    def one_pass(precision: str) -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    best = {"bf16": float("inf"), "fp32": float("inf")}
    warm = dict.fromkeys(best, float("inf"))
    for _ in range(WARMUP):
        for precision in best:
            warm[precision] = min(warm[precision], one_pass(precision))
    slow, fast = max(warm.values()), min(warm.values())
    if slow >= WARMUP_CLEAR_S and slow >= WARMUP_CLEAR_RATIO * fast:
        return warm
    for _ in range(REPEATS):
        for precision in best:
            best[precision] = min(best[precision], one_pass(precision))
        if max(best.values()) >= CLEAR_RATIO * min(best.values()):
            break  # a wide gap does not need more passes to be sure of
    return best


def decide_precision(
    precision: str,
    device: torch.device,
    probe: PrecisionProbe | None = None,
    measure: Measure | None = None,
    use_cache: bool = True,
) -> PrecisionChoice:
    """The precision a run trains in: an explicit one as given; `auto` by device and, on a CPU, by timing.

    `probe` is what to time (a CPU run without one falls back to the AMX check);
    `measure` times it (`time_one_block` by default; tests pass their own timings);
    `use_cache=False` neither reads nor writes the per-machine cache.
    """
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("precision='fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on CPU")
        return PrecisionChoice(precision, "explicit")
    if device.type == "cuda":
        return PrecisionChoice("bf16" if torch.cuda.is_bf16_supported() else "fp16", "cuda")
    if probe is None:
        from refinery.model.train import cpu_has_fast_bf16

        return PrecisionChoice("bf16" if cpu_has_fast_bf16() else "fp32", "heuristic")
    path = cache_file() if use_cache else None
    key = cache_key(probe, device)
    if path is not None:
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and entry.get("precision") in ("bf16", "fp32"):
            return PrecisionChoice(entry["precision"], "cached", dict(entry.get("timings_s", {})))
    timings = (measure or time_one_block)(probe, device)
    choice = PrecisionChoice(min(("fp32", "bf16"), key=lambda p: timings[p]), "measured", dict(timings))
    if path is not None:
        _write_cache(path, key, {"precision": choice.precision, "timings_s": choice.timings_s,
                                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
    return choice
