"""The train stage: token shards in, a checkpoint, metrics and a loss curve out.

The network and its loop live in `refinery.model`; this module only connects
them to the shards stage's outputs and keeps resumption honest: a checkpoint
left by a killed run is resumed only if it was made from the same inputs and
config, never from another dataset.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from refinery.model.train import TrainConfig, train
from refinery.storage.atomic import atomic_write_json
from refinery.storage.manifest import Counts, StageResult, describe_file
from refinery.storage.outputs import Shards
from refinery.storage.shards import TokenWindows

RUN_KEY = "run_key.json"


def _reset_if_stale(stage_dir: Path, run_key: str) -> None:
    """Drop checkpoints of a different run (other inputs or config) so we never resume across datasets."""
    key_file = stage_dir / RUN_KEY
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == run_key:
        return
    for child in stage_dir.iterdir() if stage_dir.is_dir() else []:
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(key_file, {"key": run_key})


def run_train(
    shards: Shards,
    stage_dir: Path,
    cfg: TrainConfig,
    run_key: str,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> StageResult:
    stage_dir.mkdir(parents=True, exist_ok=True)
    _reset_if_stale(stage_dir, run_key)
    if not shards.val_files or not shards.train_files:
        raise ValueError(
            f"the shards hold {shards.train_tokens} training and {shards.val_tokens} "
            "validation tokens; both splits need documents: add documents or raise shards.val_fraction"
        )
    vocab_size = shards.vocab_size
    seq_len = cfg.model_config_for(vocab_size).seq_len
    train_data = TokenWindows(shards.train_files, seq_len=seq_len, seed=cfg.seed)
    val_data = TokenWindows(shards.val_files, seq_len=seq_len, seed=cfg.seed)
    result = train(
        cfg,
        vocab_size=vocab_size,
        train_data=train_data,
        val_data=val_data,
        out_dir=stage_dir,
        on_metrics=on_metrics,
        progress=progress,
    )
    files = sorted(p for p in Path(result.checkpoint_dir).rglob("*") if p.is_file())
    files += [Path(result.metrics_file), Path(result.loss_curve)]
    outputs = [describe_file(stage_dir, p) for p in files if p.is_file()]
    metrics = {
        "steps": float(result.steps),
        "tokens_seen": float(result.tokens_seen),
        "train_loss": float(result.train_loss),
        "val_loss": float(result.val_loss),
        "tokens_per_s": float(result.tokens_per_s),
        "mfu": float(result.mfu),
        "num_params": float(result.num_params),
    }
    extra = {
        "checkpoint_dir": str(Path(result.checkpoint_dir).relative_to(stage_dir)),
        "loss_curve": str(Path(result.loss_curve).relative_to(stage_dir)),
        "metrics_file": str(Path(result.metrics_file).relative_to(stage_dir)),
    }
    return StageResult(outputs=outputs, counts=Counts(**{"in": shards.documents, "kept": shards.documents}), metrics=metrics, extra=extra)
