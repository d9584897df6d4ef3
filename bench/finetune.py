"""LoRA against full fine-tuning on the same domain set: trainable parameters, step time, peak memory, loss.

A base model is pre-trained for a moment on one family of synthetic documents
(small strides), then adapted to another (large strides) twice from the same
weights, with the same data, steps and schedule: once with LoRA (base frozen),
once updating every weight. Peak memory is the resident-set high-water mark of a
child process per method (CPU), or `torch.cuda.max_memory_allocated` on a GPU.

    python -m bench.finetune [--preset cpu-small] [--steps 60] [--record]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import record
from refinery.model.checkpoint import load_model, save_checkpoint
from refinery.model.evaluate import evaluate_loss
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.lora import LoRAConfig, LoRATrainConfig, apply_lora, count_params
from refinery.model.train import cpu_has_fast_bf16, lr_at
from refinery.storage.shards import TokenWindows, write_token_shard

# bf16 only where the CPU has native bf16 instructions; elsewhere it is emulated about 15x slower.
BF16 = cpu_has_fast_bf16()


def shards(folder: Path, name: str, vocab: int, strides: tuple[int, ...], seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(400):
        start, stride, n = rng.integers(0, vocab - 1), rng.choice(strides), rng.integers(40, 300)
        docs.append(np.array([*((start + stride * np.arange(n)) % (vocab - 1)), vocab - 1], dtype=np.uint32))
    ids = [f"{name}{i}" for i in range(len(docs))]
    write_token_shard(folder / f"{name}-train.arrow", ids[40:], docs[40:], vocab)
    write_token_shard(folder / f"{name}-val.arrow", ids[:40], docs[:40], vocab)
    return folder / f"{name}-train.arrow", folder / f"{name}-val.arrow"


def fine_tune(method: str, base_dir: str, train_path: str, val_path: str, steps: int, batch: int, queue) -> None:
    """Run in a child process so each method's peak memory is its own."""
    torch.manual_seed(0)
    model = load_model(Path(base_dir))
    model.train()
    seq = model.cfg.seq_len
    train, val = TokenWindows([train_path], seq, seed=1), TokenWindows([val_path], seq)
    tc = LoRATrainConfig(max_steps=steps, lr=3e-3 if method == "lora" else 1e-3, min_lr=1e-4, warmup_steps=5)
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=8, alpha=16))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = count_params(model)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    times = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)  # type: ignore[arg-type]
        x, y = train.next_batch(batch)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    val_loss = evaluate_loss(model, val, batch, max_batches=8, autocast_dtype=torch.bfloat16 if BF16 else None)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"method": method, "trainable": trainable, "total": total, "step_s": float(np.median(times[2:])),
               "peak_mb": peak_mb, "val_loss": val_loss})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        general = shards(folder, "general", args.vocab_size, (1, 2), 0)
        domain = shards(folder, "domain", args.vocab_size, (5, 7, 11), 1)
        torch.manual_seed(0)
        model = GPT(config_from_preset(args.preset, args.vocab_size))
        seq = model.cfg.seq_len
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        windows = TokenWindows([general[0]], seq)
        for _ in range(args.pretrain_steps):
            x, y = windows.next_batch(args.batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        base_loss = evaluate_loss(model, TokenWindows([domain[1]], seq), args.batch, 8, torch.bfloat16 if BF16 else None)
        save_checkpoint(folder / "base", model)

        ctx = mp.get_context("spawn")
        results = {}
        for method in ("lora", "full"):
            queue = ctx.Queue()
            proc = ctx.Process(target=fine_tune, args=(method, str(folder / "base"), str(domain[0]), str(domain[1]),
                                                       args.steps, args.batch, queue))  # fmt: skip
            proc.start()
            results[method] = queue.get()
            proc.join()
    lora, full = results["lora"], results["full"]

    def row(name: str, key: str, fmt: str) -> str:
        return f"| {name} | {format(lora[key], fmt)} | {format(full[key], fmt)} | {lora[key] / full[key]:.3f}x |"

    table = "\n".join([
        f"### fine-tuning, {args.preset} (vocab {args.vocab_size}), {args.steps} steps of {args.batch}x{seq} tokens, "
        f"{'bf16 autocast' if BF16 else 'fp32'}, CPU; domain val loss before fine-tuning {base_loss:.4f}",
        "", "| | LoRA (r=8, attention + MLP) | full fine-tuning | LoRA / full |", "|---|---|---|---|",
        row("trainable parameters", "trainable", ",d"),
        row("median step time (s)", "step_s", ".3f"),
        row("peak memory, process RSS (MB)", "peak_mb", ",.0f"),
        row("final validation loss", "val_loss", ".4f"),
    ])  # fmt: skip
    print(table)
    print(json.dumps(results))
    if args.record:
        record(table, "torch")


if __name__ == "__main__":
    main()
