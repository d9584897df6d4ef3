"""GPU check: training and decode speed against transformers, and a short training run, on one CUDA GPU.

Run by `bench/gpu_check.sh`, which puts the project on the path without installing it:

    python -m bench.gpu_check [--results PATH] [--cpu-dry-run] [--skip-transformers]

Three parts, one markdown table each, each appended to the results file as it finishes:

1. Training tokens/s and MFU of the 124M preset in bf16, eager and `torch.compile`d,
   against `transformers`' LlamaForCausalLM of the same shape (the helpers of bench/train.py).
2. Decode tokens/s at batch 1: KV cache eager, the compiled static step, the same step
   compiled with CUDA graphs (`mode="reduce-overhead"`), and `transformers` generate.
3. A short training run of `refinery.model.train.train` on synthetic, learnable shards
   (about 60 s): the loss must fall, or the check fails.

It imports torch, numpy, pyarrow, pydantic, safetensors and, when present, transformers;
nothing of the orchestration or tracking stack. Without transformers the comparison rows
are left out with a note. `--cpu-dry-run` runs the same code on the CPU with tiny sizes,
no compilation, in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bench.common as common
from bench.generate import timed
from bench.train import best_of, hf_twin, make_step
from refinery.model.export import llama_config, llama_state_dict
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.train import TrainConfig, peak_flops, train
from refinery.storage.shards import TokenWindows, write_token_shard

GPU = dict(preset="gpt2-small", vocab=50304, batch=16, seq_len=1024, steps=10, repeat=3,
           new_tokens=256, prompt_len=16, train_seq=1024, train_batch=16, train_s=60.0, train_steps=100_000)
DRY = dict(preset="test", vocab=256, batch=2, seq_len=32, steps=2, repeat=1,
           new_tokens=8, prompt_len=4, train_seq=32, train_batch=8, train_s=None, train_steps=40)
NO_HF = "transformers is not installed here: its comparison rows are left out."


def where(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"


def part_train(s: dict, device: torch.device, hf_ok: bool, compile: bool) -> str:
    """Training tokens/s and MFU, ours and transformers, eager and compiled."""
    precision = "bf16"
    torch.manual_seed(0)
    ours = GPT(config_from_preset(s["preset"], s["vocab"], seq_len=s["seq_len"])).to(device)
    x = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), device=device)
    steps = {"Refinery, eager": make_step(ours, x, precision, True)}
    hf = hf_twin(ours).to(device) if hf_ok else None
    if hf is not None:
        steps["transformers Llama, eager"] = make_step(hf, x, precision, False)
    if compile:
        steps["Refinery, torch.compile"] = make_step(torch.compile(ours), x, precision, True)
        if hf is not None:
            steps["transformers Llama, torch.compile"] = make_step(torch.compile(hf), x, precision, False)
    t0 = time.perf_counter()
    best = best_of(steps, s["batch"] * s["seq_len"], s["steps"], s["repeat"], device)
    peak, fpt = peak_flops(device), ours.flops_per_token(s["seq_len"])
    ref = best.get("transformers Llama, eager")
    rows = [
        f"| {name} | {tps:,.0f} | {f'{tps * fpt / peak:.1%}' if peak else 'n/a'} | "
        f"{f'{tps / ref:.2f}x' if ref else 'n/a'} |"
        for name, tps in best.items()
    ]
    notes = [] if hf_ok else [NO_HF]
    if not compile:
        notes.append("The compiled rows are left out in the dry run.")
    table = "\n".join([
        f"### GPU check 1/3: train step, {s['preset']} ({ours.num_params() / 1e6:.1f}M params), "
        f"batch {s['batch']}x{s['seq_len']}, {precision} autocast, AdamW, {where(device)}, "
        f"best of {s['repeat']} interleaved timings of {s['steps']} steps",
        "",
        "| method | tokens/s | MFU | ratio to transformers eager |",
        "|---|---|---|---|",
        *rows,
        "",
        f"MFU against a bf16 dense peak of {peak / 1e12:,.0f} TFLOP/s at {fpt / 1e6:,.0f} MFLOP/token "
        f"(6N + attention). Warm-up and compilation included: {time.perf_counter() - t0:.0f} s in all."
        if peak else "MFU: no peak known for this device.",
        *([""] + notes if notes else []),
    ])
    return table


def part_decode(s: dict, device: torch.device, hf_ok: bool, compile: bool) -> str:
    """Decode tokens/s at batch 1: eager, compiled, compiled with CUDA graphs, and transformers."""
    import refinery.model.generate as gen

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    n = s["new_tokens"]
    model = GPT(config_from_preset(s["preset"], s["vocab"], seq_len=s["prompt_len"] + n)).eval()
    hf = None
    if hf_ok:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:  # the exported weights, loaded as transformers would
            from safetensors.torch import save_file

            save_file(llama_state_dict(model), f"{tmp}/model.safetensors")
            transformers.LlamaConfig(**llama_config(model, None, None)).save_pretrained(tmp)
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=dtype).to(device).eval()
    model.to(device=device, dtype=dtype)
    prompts = torch.randint(0, s["vocab"], (1, s["prompt_len"]), device=device)
    as_lists = prompts.tolist()

    def ours(step=None):
        def run() -> list[list[int]]:
            if step is None:
                return gen.generate(model, as_lists, n, temperature=0)
            saved, gen._compiled_step = gen._compiled_step, step
            try:
                return gen.generate(model, as_lists, n, temperature=0, compile=True)
            finally:
                gen._compiled_step = saved
        return run

    def theirs() -> None:
        with torch.inference_mode():
            hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    methods = {"Refinery, KV cache, eager": ours()}
    notes, first_call = [], {}
    if compile:
        def graphed_step(*args):  # its own code object: compiled apart from the default-mode step
            return gen._decode_step(*args)

        methods["Refinery, compiled static step"] = ours(gen.compiled_decode_step())
        if device.type == "cuda":
            methods["Refinery, compiled static step, CUDA graphs"] = ours(
                torch.compile(graphed_step, mode="reduce-overhead", dynamic=False, fullgraph=True))
    else:
        notes.append("The compiled rows are left out in the dry run.")
    if hf is not None:
        methods["transformers generate"] = theirs
    else:
        notes.append(NO_HF)
    skips0 = _cudagraph_skips()
    eager_tokens = None
    for name, fn in list(methods.items()):  # warm-up; the compiled ones compile here, once for these shapes
        got: list = []
        try:
            first_call[name] = timed(lambda fn=fn, got=got: got.append(fn()))
        except Exception as e:  # a compiled variant this torch can't run: say so, keep the rest
            if not name.startswith("Refinery, compiled"):
                raise
            del methods[name]
            notes.append(f"{name}: left out, it failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        if name == "Refinery, KV cache, eager":
            eager_tokens = got[0]
        elif name.startswith("Refinery") and got[0] != eager_tokens:
            same = sum(a == b for a, b in zip(got[0][0], eager_tokens[0], strict=False))
            notes.append(f"{name}: {same} of {n} greedy tokens equal eager's (low-precision near-ties can flip).")
    skipped = _cudagraph_skips() - skips0
    best = dict.fromkeys(methods, math.inf)
    for _ in range(s["repeat"]):
        for name, fn in methods.items():
            best[name] = min(best[name], timed(fn))
    ref = n / best["transformers generate"] if "transformers generate" in best else None
    rows = [
        f"| {name} | {n / t:,.0f} | {f'{n / t / ref:.2f}x' if ref else 'n/a'} | {first_call[name]:.1f} s |"
        for name, t in best.items()
    ]
    if skipped:
        notes.append(f"Inductor skipped CUDA graphs {skipped} time(s) (see its log): the CUDA graphs row then "
                     "runs the compiled step without them.")
    table = "\n".join([
        f"### GPU check 2/3: decode, {s['preset']} ({model.num_params() / 1e6:.1f}M params), batch 1, "
        f"{s['prompt_len']}-token prompt, {n} new tokens, greedy, {str(dtype).removeprefix('torch.')}, "
        f"{where(device)}, best of {s['repeat']} interleaved runs",
        "",
        "| method | new tokens/s | ratio to transformers | first call (compiling included) |",
        "|---|---|---|---|",
        *rows,
        *([""] + notes if notes else []),
    ])
    return table


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)))
    except Exception:  # a private counter: absent in some torch versions
        return 0


def learnable_docs(rng: np.random.Generator, n_docs: int, length: int, vocab: int) -> list[np.ndarray]:
    """Arithmetic progressions modulo the vocabulary with a few strides: random, yet predictable."""
    strides = np.array([1, 2, 3, 5, 7])
    return [
        (rng.integers(0, vocab) + rng.choice(strides) * np.arange(length)) % vocab for _ in range(n_docs)
    ]


def part_train_run(s: dict, device: torch.device) -> tuple[str, bool]:
    """A short `train` run on synthetic shards: does the loss fall?"""
    losses: list[tuple[int, float]] = []
    vocab, seq = s["vocab"], s["train_seq"]
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split, n_docs in (("train", 400), ("val", 40)):
            docs = learnable_docs(rng, n_docs, 4 * seq, vocab)
            write_token_shard(f"{tmp}/{split}.arrow", [f"{split}-{i}" for i in range(n_docs)], docs, vocab)
        cfg = TrainConfig(
            preset=s["preset"], seq_len=seq, micro_batch_size=s["train_batch"],
            tokens_per_step=s["train_batch"] * seq, max_steps=s["train_steps"], max_time_s=s["train_s"],
            lr=1e-3 if gpu else 3e-3, min_lr=1e-4, warmup_steps=20 if gpu else 5,
            eval_every=100 if gpu else 20, eval_batches=4, checkpoint_every=100_000,
            precision="bf16" if gpu else "fp32", device=device.type, compile=False,
        )
        t0 = time.perf_counter()
        result = train(
            cfg, vocab, TokenWindows([f"{tmp}/train.arrow"], seq, seed=0),
            TokenWindows([f"{tmp}/val.arrow"], seq, seed=1), Path(tmp) / "run",
            on_metrics=lambda step, m: losses.append((step, m["loss"])) if "loss" in m else None,
            progress=False,
        )
        wall = time.perf_counter() - t0
    first, last = losses[0][1], result.train_loss
    budget = f"{s['train_s']:.0f} s budget" if s["train_s"] else f"{s['train_steps']} steps"
    fell = math.isfinite(last) and last < 0.75 * first
    table = "\n".join([
        f"### GPU check 3/3: `refinery.model.train.train`, {s['preset']} ({result.num_params / 1e6:.1f}M params), "
        f"{s['train_batch']}x{seq} tokens per step, {cfg.precision}, "
        f"{budget}, "
        f"synthetic learnable shards, {where(device)}",
        "",
        "| steps | tokens | first loss | last loss | val loss | tokens/s | MFU | wall | loss falls |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result.steps} | {result.tokens_seen:,} | {first:.3f} | {last:.3f} | {result.val_loss:.3f} | "
        f"{result.tokens_per_s:,.0f} | {f'{result.mfu:.1%}' if gpu else 'n/a'} | {wall:.0f} s | "
        f"{'yes' if fell else 'NO'} |",
        "",
        "The loss falls when the last training loss is under three quarters of the first one "
        "(the shards are arithmetic progressions modulo the vocabulary, so a working model learns them fast).",
    ])
    return table, fell


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="where the tables are appended")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU, no compilation")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the comparison rows")
    args = parser.parse_args()

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; use --cpu-dry-run to test the script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    s = DRY if dry else GPU
    hf_ok = not args.skip_transformers and importlib.util.find_spec("transformers") is not None
    common.RESULTS = args.results  # record() appends here
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    packages = ("torch", "transformers") if hf_ok else ("torch",)
    t_all = time.perf_counter()
    for label, run in (("1/3 train step", lambda: part_train(s, device, hf_ok, not dry)),
                       ("2/3 decode", lambda: part_decode(s, device, hf_ok, not dry))):
        t0 = time.perf_counter()
        table = run()
        print(f"{table}\n\n[gpu_check {label}: {time.perf_counter() - t0:.0f} s]\n", flush=True)
        common.record(table, *packages)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t0 = time.perf_counter()
    table, fell = part_train_run(s, device)
    print(f"{table}\n\n[gpu_check 3/3 training run: {time.perf_counter() - t0:.0f} s]\n", flush=True)
    common.record(table, *packages)
    loaded = sorted(m for m in ("prefect", "mlflow") if m in sys.modules)
    if loaded:
        print(f"gpu_check: warning: imported {', '.join(loaded)}", file=sys.stderr)
    print(f"gpu_check: done in {time.perf_counter() - t_all:.0f} s; tables appended to {args.results}")
    return 0 if fell else 1


if __name__ == "__main__":
    sys.exit(main())
