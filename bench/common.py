"""What every benchmark shares: a one-line description of the machine, and recording results."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
    """The machine's CPU model name, as the precision cache keys it."""
    from refinery.model.precision import (
        cpu_model as model_name,  # imports torch: only when a table is recorded
    )

    return model_name()


def machine(*packages: str) -> str:
    """Cores, CPU model, Python and the versions of the given distributions."""
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    torch = sys.modules.get("torch")  # only benchmarks that use torch can have used a GPU
    gpus = [torch.cuda.get_device_name(0)] if torch is not None and torch.cuda.is_available() else []
    return ", ".join([f"{os.cpu_count()} cores", cpu_model(), *gpus, f"Python {platform.python_version()}", *versions])


def record(text: str, *packages: str) -> None:
    """Append a result block and the machine it ran on to bench/RESULTS.md."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # the benchmark's own processes count too
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(f"\n{text.rstrip()}\n\nMachine: {machine(*packages)}; load average (1, 5, 15 min) at the end: {load}\n")
