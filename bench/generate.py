"""Decode throughput: Refinery's KV cache, no cache, and transformers `generate` on the exported weights.

    python -m bench.generate [--device auto|cpu|cuda] [--dtype fp32|bf16] [--preset NAME]
                             [--new-tokens 512] [--batch 1] [--repeat 3] [--record]

On a GPU the defaults become the 124M preset in bf16.

The timed runs of the methods are interleaved (A, B, C, A, B, C, ...) and each row
reports its fastest run, so a slow spell of the machine hits every method alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

from bench.common import record
from refinery.model.export import llama_config, llama_state_dict
from refinery.model.generate import generate
from refinery.model.gpt import GPT, config_from_preset


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    import transformers  # here, so `timed` imports without it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on a CPU, bf16 on a GPU")
    parser.add_argument("--preset", default=None, help="default: cpu-small on a CPU, gpt2-small on a GPU")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: 8192 on a CPU, 50304 on a GPU")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method; the fastest is reported")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("gpt2-small" if gpu else "cpu-small")
    vocab = args.vocab_size or (50304 if gpu else 8192)
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    torch.manual_seed(0)
    total = args.prompt_len + args.new_tokens
    model = GPT(config_from_preset(preset, vocab, seq_len=total)).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the exported weights, loaded as transformers would
        save_file(llama_state_dict(model), f"{tmp}/model.safetensors")
        cfg = {k: v for k, v in llama_config(model, None, None).items()}
        transformers.LlamaConfig(**cfg).save_pretrained(tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=dtype).to(device).eval()
    model.to(device=device, dtype=dtype)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), device=device)
    as_lists = prompts.tolist()
    n_new = args.batch * args.new_tokens

    def ours(use_cache: bool, compile: bool = False):
        return lambda: generate(model, as_lists, args.new_tokens, temperature=0, use_cache=use_cache, compile=compile)

    def theirs():
        with torch.inference_mode():
            hf.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    generate(model, as_lists, 8, temperature=0)  # warm-up
    with torch.inference_mode():
        hf.generate(prompts, max_new_tokens=8, do_sample=False)
    compile_s = timed(ours(True, compile=True))  # traced and compiled once for these shapes, then one run
    methods = {"cached": ours(True), "compiled": ours(True, compile=True), "transformers": theirs,
               "uncached": ours(False)}
    best = dict.fromkeys(methods, float("inf"))
    for i in range(args.repeat):
        for name, fn in methods.items():
            if name == "uncached" and i > 0:
                continue  # ten times slower than the rest: one run says enough
            best[name] = min(best[name], timed(fn))
    cached, compiled, reference, uncached = (
        n_new / best[k] for k in ("cached", "compiled", "transformers", "uncached")
    )
    table = "\n".join(
        [
            f"### decode, {preset} ({model.num_params() / 1e6:.1f}M params), batch {args.batch}, "
            f"{args.new_tokens} new tokens, greedy, {dtype_name}, "
            f"{torch.cuda.get_device_name(device) if gpu else 'CPU'}, best of {args.repeat} interleaved runs",
            "",
            "| method | new tokens/s | ratio to transformers |",
            "|---|---|---|",
            f"| Refinery, KV cache | {cached:,.0f} | {cached / reference:.2f}x |",
            f"| Refinery, KV cache, compiled static step | {compiled:,.0f} | {compiled / reference:.2f}x |",
            f"| Refinery, no cache | {uncached:,.0f} | {uncached / reference:.2f}x |",
            f"| transformers generate | {reference:,.0f} | 1.00x |",
        ]
    )
    table += (
        f"\n\nThe compiled step (`generate(..., compile=True)`, `torch.compile` of one static-shape step) "
        f"took {compile_s:.1f} s on its first call (compiling, once per shape, plus one run), outside the timed runs."
    )
    print(table)
    if args.record:
        record(table, "torch", "transformers")


if __name__ == "__main__":
    main()
