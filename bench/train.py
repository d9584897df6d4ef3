"""Training-step throughput: Refinery's GPT against transformers' LlamaForCausalLM of the same shape.

Same shape, batch, precision, optimizer (AdamW) and device; random tokens (speed only).

    python -m bench.train [--precision bf16|fp32|both] [--steps 8] [--repeat 3] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from bench.common import record
from refinery.model.export import llama_config
from refinery.model.gpt import GPT, config_from_preset


def hf_twin(model: GPT) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**{k: v for k, v in llama_config(model, None, None).items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg)


def tokens_per_s(step, batch_tokens: int, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_tokens * steps / (time.perf_counter() - t0)


def best_of(steps: dict, batch_tokens: int, n_steps: int, repeat: int) -> dict[str, float]:
    """Best tokens/s of each step function over `repeat` interleaved timings (A, B, A, B, ...).

    Interleaving makes a slow spell of a shared machine hit every method alike.
    """
    for step in steps.values():  # warm-up: allocator, thread pools, optimizer state
        step()
        step()
    best = dict.fromkeys(steps, 0.0)
    for _ in range(repeat):
        for name, step in steps.items():
            best[name] = max(best[name], tokens_per_s(step, batch_tokens, n_steps))
    return best


def make_step(model: torch.nn.Module, x: torch.Tensor, precision: str, ours: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = model(x, x)[1] if ours else model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timings per method; the best is reported")
    parser.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = GPT(config_from_preset(args.preset, args.vocab_size, seq_len=args.seq_len))
    hf = hf_twin(ours)
    x = torch.randint(0, args.vocab_size, (args.batch, args.seq_len))
    n = args.batch * args.seq_len
    rows = []
    for precision in ["bf16", "fp32"] if args.precision == "both" else [args.precision]:
        best = best_of(
            {"ours": make_step(ours, x, precision, True), "hf": make_step(hf, x, precision, False)},
            n, args.steps, args.repeat,
        )
        r, h = best["ours"], best["hf"]
        rows.append(f"| {precision} | {r:,.0f} | {h:,.0f} | {r / h:.2f}x |")
    table = "\n".join(
        [
            f"### train step, {args.preset} ({ours.num_params() / 1e6:.1f}M params), batch {args.batch}x{args.seq_len}, "
            f"AdamW, CPU, best of {args.repeat} interleaved timings of {args.steps} steps",
            "",
            "| precision | Refinery tokens/s | transformers Llama tokens/s | ratio |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.record:
        record(table, "torch", "transformers")


if __name__ == "__main__":
    main()
