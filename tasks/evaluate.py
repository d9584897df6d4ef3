"""The eval stage: validation loss, bits per byte, a unigram baseline, and samples.

The unigram baseline (add-one smoothed token frequencies of the training split,
scored on the validation split) is the floor a model must clearly beat to have
learnt anything beyond token frequencies; both numbers are reported side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from refinery.model.checkpoint import load_model
from refinery.model.evaluate import bits_per_byte, evaluate_loss, unigram_loss
from refinery.model.generate import generate
from refinery.storage.atomic import atomic_write_json, atomic_write_text
from refinery.storage.manifest import Counts, StageResult, describe_file
from refinery.storage.outputs import Checkpoint, Shards, TokenizerFile
from refinery.storage.shards import TokenWindows, map_tokens


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, ge=1)
    max_batches: int | None = Field(64, ge=1, description="cap on validation batches; none evaluates every window")
    prompts: list[str] = Field(
        default_factory=lambda: ["def ", "The ", "import ", "class "],
        description="prompts for sample generations",
    )
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int | None = Field(50, ge=1)
    top_p: float | None = Field(0.95, gt=0.0, le=1.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model is evaluated: a CUDA GPU when one is visible (auto), or the CPU"
    )
    min_gain_over_unigram: float | None = Field(
        0.10, ge=0.0, lt=1.0,
        description="a model counts as useful when its validation loss is at least this fraction below the "
        "unigram baseline; otherwise the run warns and registers nothing (tracking.register_poor_models "
        "registers it anyway); null: no check",
    )


def poor_model_warning(metrics: dict[str, float], min_gain: float | None) -> str | None:
    """Why an evaluated model is not worth registering, or None.

    The unigram baseline is what knowing only token frequencies scores; a model
    that does not beat it by a margin has learnt little else, which on a small
    corpus is what happens, however low its training loss went.
    """
    val, unigram = metrics.get("val_loss"), metrics.get("unigram_loss")
    if min_gain is None or val is None or not unigram:
        return None
    if val <= (1.0 - min_gain) * unigram:
        return None
    gain = 1.0 - val / unigram
    return (
        f"the model is no better than its baseline: validation loss {val:.4f} nats/token is {gain:.1%} below the "
        f"unigram baseline {unigram:.4f} (a model that knows only token frequencies), short of the "
        f"{min_gain:.0%} eval.min_gain_over_unigram asks for: no useful model could be trained on this corpus, "
        "which is probably too small for it. Add documents, or pin a smaller train.preset"
    )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.array([], np.uint16))


def run_eval(
    checkpoint: Checkpoint,
    tokenizer: TokenizerFile,
    shards: Shards,
    stage_dir: Path,
    cfg: EvalConfig,
) -> StageResult:
    stage_dir.mkdir(parents=True, exist_ok=True)
    from refinery.model.train import resolve_device

    model = load_model(checkpoint.checkpoint_dir, device=str(resolve_device(cfg.device)))
    seq_len = model.cfg.seq_len
    val_files = shards.val_files
    val = TokenWindows(val_files, seq_len=seq_len)
    val_loss = evaluate_loss(model, val, batch_size=cfg.batch_size, max_batches=cfg.max_batches)

    vocab_size = shards.vocab_size
    train_tokens = _concat(map_tokens(shards.train_files))
    val_tokens = _concat(map_tokens(val_files))
    baseline = unigram_loss(train_tokens, val_tokens, vocab_size)
    n_tokens, n_bytes = shards.val_tokens, shards.val_bytes

    tok = Tokenizer.from_file(str(tokenizer.file))
    eot = shards.eot_id
    prompts = [tok.encode(p).ids for p in cfg.prompts]
    outs = generate(
        model,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_id=eot,
        seed=cfg.seed,
    )
    samples = [
        {"prompt": p, "completion": tok.decode(o, skip_special_tokens=True)}
        for p, o in zip(cfg.prompts, outs, strict=True)
    ]

    metrics = {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        "val_bpb": bits_per_byte(val_loss, n_tokens, n_bytes),
        "unigram_loss": baseline,
        "unigram_bpb": bits_per_byte(baseline, n_tokens, n_bytes),
        "loss_vs_unigram": val_loss / baseline if baseline else float("nan"),
    }
    metrics_path = stage_dir / "metrics.json"
    samples_path = stage_dir / "samples.jsonl"
    atomic_write_json(metrics_path, metrics)
    atomic_write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    outputs = [describe_file(stage_dir, metrics_path), describe_file(stage_dir, samples_path, rows=len(samples))]
    return StageResult(
        outputs=outputs,
        counts=Counts(**{"in": shards.documents, "kept": shards.documents}),
        metrics=metrics,
        extra={"samples": samples},
    )
