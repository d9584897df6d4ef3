"""bench/gpu_check.sh end to end in its CPU dry run: every part's table, and bench/RESULTS.md untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 25-45 s on two busy cores: the imports and a 40-step training run
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(out), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry-run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(via the shim)" in proc.stdout
    text = out.read_text(encoding="utf-8")
    for head in ("### GPU check 1/3: train step", "### GPU check 2/3: decode", "### GPU check 3/3: "):
        assert head in text, text
    assert "| Refinery, eager |" in text and "| Refinery, KV cache, eager |" in text
    assert "| yes |" in text  # the loss fell
    assert text.count("Machine: ") == 3
    assert "warning: imported" not in proc.stderr  # nothing of the orchestration or tracking stack
    assert (results.read_bytes() if results.exists() else None) == before
