"""Validation loss, bits per byte, and the unigram baseline a trained model must beat."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from refinery.model.gpt import GPT
from refinery.storage.shards import TokenWindows


@torch.no_grad()
def evaluate_loss(
    model: GPT,
    data: TokenWindows,
    batch_size: int,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean cross-entropy in nats per token over consecutive validation windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    total, count = 0.0, 0
    try:
        for x, y in data.eval_batches(batch_size, max_batches):
            xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            with autocast:
                _, loss = model(xt, yt)
            total += float(loss) * yt.numel()
            count += yt.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no validation windows: the validation split is shorter than one window")
    return total / count


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Convert nats per token to bits per UTF-8 byte, which compares across tokenizers."""
    if n_bytes <= 0:
        raise ValueError("n_bytes must be positive")
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val_tokens` of add-one smoothed token frequencies from `train_tokens`."""
    counts = (
        np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    )
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[np.asarray(val_tokens, dtype=np.int64)].mean())
