"""A folder with about 30k tokens after curation: the run says the corpus is small, stops early on
validation loss, and registers the model only when it beats the unigram baseline by the margin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from refinery.flows.cli import app
from refinery.model import sizing

runner = CliRunner()


def write_docs(folder: Path, target_bytes: int = 110_000) -> int:
    """Pages of the Python reference documentation (shipped with Python), one Markdown file each."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True)
    written = 0
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) < 1500 or len(text) > 8000:
            continue
        (folder / f"{name}.md").write_text(f"# {name}\n\n{text}\n")
        written += len(text)
        if written >= target_bytes:
            break
    return written


def test_a_small_corpus_is_called_small_stops_early_and_registers_only_a_useful_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sizing.LADDERS, "cpu", ("test",))  # the real choice, among sizes fast enough for a test
    monkeypatch.setenv("REFINERY_PRECISION_CACHE", "off")
    write_docs(tmp_path / "docs")
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "tokenizer": {"vocab_size": 1024},
        # The test preset made wide enough to memorise 30k tokens within the budget, as cpu-tiny does in minutes.
        "train": {"d_model": 128, "n_head": 4, "micro_batch_size": 8, "tokens_per_step": 512, "max_time_s": 60,
                  "lr": 1e-2, "min_lr": 1e-3, "eval_batches": 4, "precision": "fp32"},
        "eval": {"max_batches": 8, "max_new_tokens": 4},
        "execution": {"progress": False},
    }))  # fmt: skip
    root = tmp_path / "run"
    result = runner.invoke(app, ["run", "--root", str(root), "--source", str(tmp_path / "docs"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output
    tokens = int(re.search(r"plan: ([\d,]+) training tokens", out).group(1).replace(",", ""))
    assert 15_000 <= tokens <= 60_000, out  # about 30k tokens after curation
    assert "the corpus is small for this model" in out and "preset auto: test" in out, out
    assert "early stop at step" in out, out
    val = float(re.search(r"validation loss\s+([\d.]+) nats/token", out).group(1))
    unigram = float(re.search(r"unigram baseline\s+([\d.]+) nats/token", out).group(1))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'refinery-lm'") if client.search_registered_models() else []
    if val <= 0.9 * unigram:
        assert "Model registered" in out and len(versions) == 1, out
    else:
        assert "no better than its baseline" in out and "no model registered" in out and not versions, out
