"""Inference: int8 weight-only against fp32, bf16 and PyTorch's dynamic int8; the server batched and not.

Part 1 trains a small model for a moment on predictable synthetic documents (or
loads `--checkpoint` with `--val` shards), then reports for each variant its
weight memory, greedy decode tokens/s (batch 1, KV cache) and validation loss.
The peer for int8 is `torch.ao.quantization.quantize_dynamic` (int8 weights and
activations) on the same layers.

Part 2 serves the model on loopback and sends a bounded burst of concurrent
requests: greedy with batching (max_batch_size 8) and without (1), then sampled
requests each with its own `seed` (batched: per-row random generators let
differently seeded requests share a batch), reporting requests/s and p50/p99.

    python -m bench.serve [--preset cpu-small] [--requests 48] [--serve-only] [--record]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.common import record
from refinery.model.evaluate import evaluate_loss
from refinery.model.generate import generate
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.quantize import memory_report, quantize_int8
from refinery.model.train import cpu_has_fast_bf16
from refinery.storage.shards import TokenWindows, write_token_shard


def synthetic_shards(folder: Path, vocab: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(600):
        start, stride, n = rng.integers(0, vocab - 1), rng.integers(1, 6), rng.integers(40, 300)
        docs.append(np.array([*((start + stride * np.arange(n)) % (vocab - 1)), vocab - 1], dtype=np.uint32))
    ids = [f"d{i}" for i in range(len(docs))]
    write_token_shard(folder / "train.arrow", ids[60:], docs[60:], vocab)
    write_token_shard(folder / "val.arrow", ids[:60], docs[:60], vocab)
    return folder / "train.arrow", folder / "val.arrow"


def quick_train(model: GPT, train: TokenWindows, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        x, y = train.next_batch(8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def dynamic_int8(model: GPT) -> torch.nn.Module:
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    return torch.ao.quantization.quantize_dynamic(model, {n: qconfig for n in names}, inplace=False)


def weight_mb(model: torch.nn.Module) -> float:
    total = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values()
                if isinstance(t, torch.Tensor))  # fmt: skip
    return total / 2**20


def decode_tokens_per_s(model: torch.nn.Module, prompt_len: int, new_tokens: int) -> float:
    prompt = [list(range(1, prompt_len + 1))]
    generate(model, prompt, 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, prompt, new_tokens, temperature=0)
    return len(out[0]) / (time.perf_counter() - t0)


def load_test(model: GPT, requests: int, batch: int, max_tokens: int, seeded: bool = False) -> tuple[float, float, float]:
    """(requests/s, p50 s, p99 s) of a burst from 16 client threads; `seeded`: sampled, request i with seed i."""
    import httpx

    from refinery.serving.server import ServerConfig, create_app, serving
    from refinery.tasks.tokenizer import EOT, new_byte_level_bpe

    tok = new_byte_level_bpe()
    from tokenizers import pre_tokenizers, trainers

    tok.train_from_iterator(["def f(x):\n    return x\n" * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    cfg = ServerConfig(max_batch_size=batch, batch_window_ms=5, max_tokens_limit=max_tokens)
    with serving(create_app(model, tok, cfg)) as url, httpx.Client(base_url=url, timeout=300) as client:
        client.post("/v1/completions", json={"prompt": "def", "max_tokens": 2})

        def one(i: int) -> float:
            t0 = time.perf_counter()
            sampling = {"temperature": 0.8, "seed": i} if seeded else {"temperature": 0}
            r = client.post("/v1/completions", json={"prompt": f"def f{i}(x):", "max_tokens": max_tokens, **sampling})
            r.raise_for_status()
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            lat = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    return requests / wall, statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--serve-only", action="store_true", help="skip part 1 (no training, no int8 table)")
    parser.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        train_path, val_path = synthetic_shards(Path(tmp), args.vocab_size)
        model = GPT(config_from_preset(args.preset, args.vocab_size))
        seq = model.cfg.seq_len
        quick_train(model, TokenWindows([train_path], seq), 0 if args.serve_only else args.train_steps)
        val = TokenWindows([val_path], seq)
        variants: dict[str, torch.nn.Module] = {} if args.serve_only else {"fp32": model}
        if variants and cpu_has_fast_bf16():  # without native bf16 instructions the CPU emulates it about 15x slower
            variants["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
        if variants:
            variants["int8 weight-only (Refinery)"] = quantize_int8(copy.deepcopy(model))
            variants["int8 dynamic (torch.ao peer)"] = dynamic_int8(model)
        rows, base = [], {}
        for name, m in variants.items():
            loss = evaluate_loss(m, val, 8, max_batches=8)
            tps = decode_tokens_per_s(m, 16, args.new_tokens)
            mb = weight_mb(m) if "torch.ao" in name else memory_report(m).total_mb
            base = base or {"loss": loss, "tps": tps, "mb": mb}
            rows.append(f"| {name} | {mb:.1f} ({mb / base['mb']:.2f}x) | {tps:,.0f} ({tps / base['tps']:.2f}x) | "
                        f"{loss:.4f} ({100 * (loss - base['loss']) / base['loss']:+.2f}%) |")  # fmt: skip
        quant_table = "\n".join([
            f"### int8 inference, {args.preset} ({model.num_params() / 1e6:.1f}M params, vocab {args.vocab_size}), "
            f"batch-1 greedy decode of {args.new_tokens} tokens, {torch.get_num_threads()} threads",
            "", "| variant | weights MB (vs fp32) | decode tokens/s (vs fp32) | val loss (vs fp32) |", "|---|---|---|---|",
            *rows,
        ])  # fmt: skip
        if not args.serve_only:
            print(quant_table, flush=True)

        serve_rows = []
        results = {}
        for batch, seeded in ((8, False), (1, False), (8, True), (1, True)):
            rps, p50, p99 = load_test(model, args.requests, batch, args.max_tokens, seeded)
            results[batch, seeded] = rps
            kind = "sampled, one seed per request" if seeded else "greedy"
            serve_rows.append(f"| {kind} | {batch} | {rps:.1f} | {p50 * 1000:.0f} | {p99 * 1000:.0f} |")
        serve_table = "\n".join([
            f"### completions server, {args.preset}, {args.requests} concurrent requests of {args.max_tokens} "
            "tokens from 16 client threads, loopback",
            "", "| requests | max_batch_size | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|", *serve_rows,
            "", f"batching speed-up: {results[8, False] / results[1, False]:.2f}x requests/s greedy, "
            f"{results[8, True] / results[1, True]:.2f}x with a different seed per request",
        ])  # fmt: skip
        print("\n" + serve_table)
    if args.record:
        record(serve_table if args.serve_only else f"{quant_table}\n\n{serve_table}", "torch")


if __name__ == "__main__":
    main()
