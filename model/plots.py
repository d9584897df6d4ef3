"""The loss-curve plot written next to the metrics after training."""

from __future__ import annotations

import json
from pathlib import Path

from refinery.storage.atomic import atomic_path


def read_metrics(metrics_file: Path) -> list[dict[str, float]]:
    """Records of metrics.jsonl; a torn last line (a killed run) is ignored."""
    records = []
    for line in Path(metrics_file).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def plot_loss_curve(metrics_file: Path, out_path: Path, title: str = "training loss") -> Path:
    """Train loss per step and validation loss at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), lw=1, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_path)
