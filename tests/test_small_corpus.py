"""A folder with about 30k tokens after curation: the run says the corpus is small, stops early on
validation loss, and registers the model only when it beats the unigram baseline by the margin."""

from __future__ import annotations

import json
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
        # The test preset made wide enough to memorise 30k tokens in a few hundred steps, as cpu-tiny does; a step
        # budget rather than a time budget, so that a busy machine changes nothing.
        "train": {"d_model": 256, "n_head": 4, "micro_batch_size": 8, "tokens_per_step": 512, "max_time_s": None, "max_steps": 800,
                  "lr": 1e-2, "min_lr": 1e-3, "eval_batches": 4, "precision": "fp32"},
        "eval": {"max_batches": 8, "max_new_tokens": 4},
        "execution": {"progress": False},
    }))  # fmt: skip
    root = tmp_path / "run"
    result = runner.invoke(app, ["run", "--root", str(root), "--source", str(tmp_path / "docs"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output  # the run's summary; the stages' own messages go to the log, their facts to the manifests
    train = json.loads((root / "train" / "manifest.json").read_text())
    evaluation = json.loads((root / "eval" / "manifest.json").read_text())
    assert 15_000 <= train["metrics"]["plan_train_tokens"] <= 60_000  # about 30k tokens after curation
    assert train["extra"]["small_corpus"].startswith("the corpus is small for this model")
    assert train["extra"]["early_stop_patience"] == 2
    assert train["metrics"]["stopped_early"] == 1.0, train["metrics"]  # validation loss stopped improving
    assert train["metrics"]["steps"] < train["metrics"]["planned_steps"]
    val, unigram = evaluation["metrics"]["val_loss"], evaluation["metrics"]["unigram_loss"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'refinery-lm'") if client.search_registered_models() else []
    if val <= 0.9 * unigram:
        assert "Model registered" in out and len(versions) == 1, out
    else:
        assert "no useful model could be trained on this corpus" in out and "no model registered" in out, out
        assert not versions
