"""Checkpoints: weights in safetensors, the model config in JSON, training state via `weights_only=True`.

A checkpoint is a folder:

    model.safetensors   the weights (the tied output projection stored once, as `embed.weight`)
    config.json         {"model": GPTConfig fields, "step": ..., plus whatever the trainer adds}
    train_state.pt      optimizer, step, RNG and data-loader state; only tensors and plain
                        containers, so it loads with `torch.load(weights_only=True)`

A new checkpoint is written completely beside the old one (`<name>.next`) and then
swapped in by two renames, so a run killed at any moment leaves one complete
checkpoint to resume from; `find_checkpoint` knows where to look.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refinery.model.gpt import GPT, GPTConfig
from refinery.storage.atomic import atomic_path, atomic_write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def save_checkpoint(
    checkpoint_dir: Path,
    model: GPT,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and optionally the training state) to `checkpoint_dir`, replacing it whole."""
    checkpoint_dir = Path(checkpoint_dir)
    staging = checkpoint_dir.with_name(checkpoint_dir.name + ".next")
    previous = checkpoint_dir.with_name(checkpoint_dir.name + ".prev")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the same storage as embed.weight
    with atomic_path(staging / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "step": str((meta or {}).get("step", 0))})
    atomic_write_json(staging / CONFIG, {**(meta or {}), "model": model.cfg.model_dump()})
    if train_state is not None:
        with atomic_path(staging / TRAIN_STATE) as tmp:
            torch.save(train_state, tmp)

    # Swap: the old folder steps aside, the new one takes its name, the old one goes.
    shutil.rmtree(previous, ignore_errors=True)
    if checkpoint_dir.exists():
        checkpoint_dir.rename(previous)
    staging.rename(checkpoint_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return checkpoint_dir


def _complete(path: Path, need_state: bool) -> bool:
    return (
        (path / WEIGHTS).is_file()
        and (path / CONFIG).is_file()
        and (not need_state or (path / TRAIN_STATE).is_file())
    )


def find_checkpoint(checkpoint_dir: Path, need_state: bool = False) -> Path | None:
    """The complete checkpoint at `checkpoint_dir`, or the one a swap cut short left beside it."""
    checkpoint_dir = Path(checkpoint_dir)
    for candidate in (
        checkpoint_dir,
        checkpoint_dir.with_name(checkpoint_dir.name + ".next"),
        checkpoint_dir.with_name(checkpoint_dir.name + ".prev"),
    ):
        if candidate.is_dir() and _complete(candidate, need_state):
            return candidate
    return None


class CheckpointConfigError(ValueError):
    """A checkpoint's `config.json` that can't be read back (edited by hand, damaged): says which file and what to do."""


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The checkpoint's saved config; a damaged file raises `CheckpointConfigError` naming it, not a JSON traceback."""
    path = Path(checkpoint_dir) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = f"not valid JSON ({exc})"
    else:
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return config
        problem = "not an object with a \"model\" object of GPTConfig fields"
    raise CheckpointConfigError(
        f"{path} is {problem}. It was edited or damaged; restore it, or delete {Path(checkpoint_dir)} "
        "to train from scratch"
    )


def load_model(checkpoint_dir: Path, device: str | torch.device = "cpu") -> GPT:
    """The model saved in `checkpoint_dir`, in eval mode, on `device`."""
    found = find_checkpoint(Path(checkpoint_dir))
    if found is None:
        raise FileNotFoundError(
            f"no complete checkpoint ({WEIGHTS} + {CONFIG}) in {checkpoint_dir}; train a model first"
        )
    cfg = GPTConfig(**read_config(found)["model"])
    model = GPT(cfg)
    load_weights(model, found)
    return model.to(device).eval()


def load_weights(model: GPT, checkpoint_dir: Path) -> None:
    tensors = load_file(str(Path(checkpoint_dir) / WEIGHTS))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint_dir} does not match the model: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_train_state(checkpoint_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The optimizer/RNG/loader state; `weights_only=True`, so nothing in it can run code."""
    return torch.load(Path(checkpoint_dir) / TRAIN_STATE, map_location=map_location, weights_only=True)
