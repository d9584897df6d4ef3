"""Training-step throughput: Refinery's GPT against transformers' LlamaForCausalLM of the same shape.

Same shape, batch, precision, optimizer (AdamW, fused on CUDA for both) and device; random
tokens (speed only). On a GPU the defaults become the 124M preset, batch 16x1024, bf16, and
each row also gives MFU against the GPU's bf16 dense peak.

    python -m bench.train [--device auto|cpu|cuda] [--precision bf16|fp32|both] [--compile]
                          [--preset NAME] [--batch B] [--seq-len T] [--steps 8] [--repeat 3] [--record]

`--compile` adds rows with both models through `torch.compile` (the GPU goal compares ours
compiled with transformers eager; the compiled transformers row keeps that comparison honest).

Below the table, what `precision: auto` decides for these shapes on this machine (measured
afresh, not from the cache) and whether it is the faster of the bf16 and fp32 rows above.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.common import record
from refinery.model.export import llama_config
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.precision import PrecisionProbe, decide_precision
from refinery.model.train import peak_flops


def hf_twin(model: GPT) -> torch.nn.Module:
    import transformers  # here, so the helpers of this module import without it

    cfg = transformers.LlamaConfig(**{k: v for k, v in llama_config(model, None, None).items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_s(step, batch_tokens: int, steps: int, device: torch.device = torch.device("cpu")) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_tokens * steps / (time.perf_counter() - t0)


def best_of(
    steps: dict, batch_tokens: int, n_steps: int, repeat: int, device: torch.device = torch.device("cpu")
) -> dict[str, float]:
    """Best tokens/s of each step function over `repeat` interleaved timings (A, B, A, B, ...).

    Interleaving makes a slow spell of a shared machine hit every method alike.
    """
    for step in steps.values():  # warm-up: allocator, thread pools, optimizer state, compilation
        step()
        step()
    best = dict.fromkeys(steps, 0.0)
    for _ in range(repeat):
        for name, step in steps.items():
            best[name] = max(best[name], tokens_per_s(step, batch_tokens, n_steps, device))
    return best


def make_step(model: torch.nn.Module, x: torch.Tensor, precision: str, ours: bool):
    """One optimizer step on batch x (inputs as targets) for our model or the transformers one."""
    device = x.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = model(x, x)[1] if ours else model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def auto_line(model: GPT, batch: int, seq_len: int, device: torch.device, tps: dict[str, float]) -> str:
    """What `precision: auto` picks for these shapes here (measured now), checked against the measured steps."""
    choice = decide_precision("auto", device, PrecisionProbe.for_model(model.cfg, batch, seq_len), use_cache=False)
    probe = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(choice.timings_s.items()))
    line = f"`precision: auto` chose **{choice.precision}** ({choice.source}{'; one-block pass: ' + probe if probe else ''})"
    if len(tps) < 2:
        return line + "."
    faster = max(tps, key=tps.get)
    ratio = tps["bf16"] / tps["fp32"]
    verdict = "the faster one" if choice.precision == faster else f"NOT the faster one ({faster} is)"
    return f"{line}: {verdict}; Refinery bf16/fp32 step speed here {ratio:.2f}x."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--preset", default=None, help="default: cpu-small on a CPU, gpt2-small on a GPU")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: 8192 on a CPU, 50304 on a GPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on a CPU, 16 on a GPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 256 on a CPU, 1024 on a GPU")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timings per method; the best is reported")
    parser.add_argument("--precision", choices=["bf16", "fp32", "both"], default=None,
                        help="default: both on a CPU, bf16 on a GPU")
    parser.add_argument("--compile", action="store_true", help="add rows with both models through torch.compile")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("gpt2-small" if gpu else "cpu-small")
    vocab = args.vocab_size or (50304 if gpu else 8192)
    batch, seq_len = args.batch or (16 if gpu else 8), args.seq_len or (1024 if gpu else 256)
    precisions = {"both": ["bf16", "fp32"], None: ["bf16"] if gpu else ["bf16", "fp32"]}.get(
        args.precision, [args.precision])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows use TF32 tensor cores, in both models
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    ours = GPT(config_from_preset(preset, vocab, seq_len=seq_len)).to(device)
    hf = hf_twin(ours).to(device)
    x = torch.randint(0, vocab, (batch, seq_len), device=device)
    n = batch * seq_len
    peak = peak_flops(device)
    flops_per_token = ours.flops_per_token(seq_len)

    def row(label: str, r: float, h: float) -> str:
        mfu = f" | {r * flops_per_token / peak:.1%} | {h * flops_per_token / peak:.1%}" if peak else ""
        return f"| {label} | {r:,.0f} | {h:,.0f} | {r / h:.2f}x{mfu} |"

    rows = []
    ours_tps: dict[str, float] = {}
    for precision in precisions:
        steps = {"ours": make_step(ours, x, precision, True), "hf": make_step(hf, x, precision, False)}
        if args.compile:
            steps["ours compiled"] = make_step(torch.compile(ours), x, precision, True)
            steps["hf compiled"] = make_step(torch.compile(hf), x, precision, False)
        best = best_of(steps, n, args.steps, args.repeat, device)
        ours_tps[precision] = best["ours"]
        rows.append(row(precision, best["ours"], best["hf"]))
        if args.compile:
            rows.append(row(f"{precision}, ours compiled vs transformers eager", best["ours compiled"], best["hf"]))
            rows.append(row(f"{precision}, both compiled", best["ours compiled"], best["hf compiled"]))
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    mfu_head = " | Refinery MFU | transformers MFU" if peak else ""
    table = "\n".join(
        [
            f"### train step, {preset} ({ours.num_params() / 1e6:.1f}M params), batch {batch}x{seq_len}, "
            f"AdamW, {where}, best of {args.repeat} interleaved timings of {args.steps} steps",
            "",
            f"| precision | Refinery tokens/s | transformers Llama tokens/s | ratio{mfu_head} |",
            "|---|---|---|---|" + ("---|---|" if peak else ""),
            *rows,
            "",
            auto_line(ours, batch, seq_len, device, ours_tps),
        ]
    )
    print(table)
    if args.record:
        record(table, "torch", "transformers")


if __name__ == "__main__":
    main()
