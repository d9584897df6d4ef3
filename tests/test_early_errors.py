"""Problems a run can see coming are reported before work starts, or where the corpus runs dry.

Through the real command line (typer's CliRunner; the flow in process):
- a missing source and a folder with nothing to ingest stop at once with a one-line
  message and exit code 2, and no run root is created (so no Prefect or MLflow store);
- a folder of only unreadable files gets through the check (its files match the
  globs) and stops after ingest, naming the stage and its quarantine reasons;
- a corpus that the filter empties stops after the filter, naming it and its drop
  reasons, instead of failing inside the tokenizer; no later stage runs.

Also what a run tidies before it starts: MLflow runs left RUNNING by a process that
was killed are marked KILLED, and the experiment is tagged as a model-training one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_lineage_graph import write_corpus
from typer.testing import CliRunner

from refinery.flows import pipeline  # noqa: F401 - Prefect sets up its log handlers now, on pytest's stderr,
from refinery.flows.cli import app  # not on a CliRunner stream that is closed after its command
from refinery.storage.manifest import read_manifest

runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_tracking_store(monkeypatch):
    """Each run here tracks into its own root's store; whatever a run sets is undone for the next test module."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _run(root: Path, *args: str):
    return runner.invoke(app, ["run", "--root", str(root), "--set", "execution.progress=false", *args])


def test_a_missing_source_stops_before_anything_is_created(tmp_path) -> None:
    root = tmp_path / "run"
    result = _run(root, "--source", str(tmp_path / "no-such-folder"))
    assert result.exit_code == 2, result.output
    assert "no-such-folder" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output
    assert not root.exists()


def test_a_folder_with_nothing_to_ingest_stops_before_anything_is_created(tmp_path) -> None:
    root = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".notes.txt").write_text("excluded by the default ingest.exclude\n")
    for folder in ("empty", "hidden"):
        result = _run(root, "--source", str(tmp_path / folder))
        assert result.exit_code == 2, result.output
        assert "has no file to ingest" in result.output and "ingest.include" in result.output
        assert not root.exists()


def test_a_folder_of_only_bad_files_stops_after_ingest_with_the_quarantine_reasons(tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scan.pdf").write_bytes(b"%PDF-1.4 truncated \x00\x01")
    (bad / "letter.docx").write_bytes(b"PK\x03\x04 not a zip")
    root = tmp_path / "run"
    result = _run(root, "--source", str(bad), "--stages", "ingest,dedup")
    assert result.exit_code not in (0, 2), result.output
    assert "error: stage 'ingest' kept 0 of 2 documents (quarantined: " in result.output, result.output
    assert "nothing is left for 'dedup'" in result.output and "Traceback" not in result.output
    assert read_manifest(root / "ingest") is not None and read_manifest(root / "dedup") is None


def test_a_corpus_the_filter_empties_stops_at_the_filter_with_its_drop_reasons(tmp_path) -> None:
    sources = write_corpus(tmp_path / "corpus")
    root = tmp_path / "run"
    result = _run(root, "--source", sources[0], "--stages", "ingest,dedup,filter,tokenizer",
                  "--set", "filter.gopher_quality.min_words=100000")
    assert result.exit_code not in (0, 2), result.output
    assert "error: stage 'filter' kept 0 of " in result.output, result.output
    assert "(dropped: gopher_word_count " in result.output and "nothing is left for 'tokenizer'" in result.output
    assert "Traceback" not in result.output
    assert read_manifest(root / "filter") is not None and read_manifest(root / "tokenizer") is None


def test_the_summary_lists_drop_and_quarantine_reasons_per_stage(capsys) -> None:
    from refinery.flows.cli import print_summary

    stage = {"status": "ran", "in": 10, "kept": 7, "seconds": 0.1, "metrics": {}}
    print_summary({"root": "/r", "stages": {
        "ingest": {**stage, "dropped": {"corrupt": 2, "too_large": 1}},
        "dedup": {**stage, "dropped": {}},
        "filter": {**stage, "dropped": {f"rule_{i}": i + 1 for i in range(8)}},
    }})
    out = capsys.readouterr().out
    assert "  ingest     corrupt 2, too_large 1\n" in out
    assert "  filter     rule_7 8, rule_6 7, rule_5 6, rule_4 5, rule_3 4, rule_2 3, +2 more\n" in out
    assert "  dedup " not in out


def test_runs_left_running_by_a_dead_process_are_marked_killed(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from refinery.flows.lineage import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Lineage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Lineage(uri, "refinery", tmp_path / "mlartifacts")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(first.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()

    def running(kind: str, pid: int, on: str = host) -> str:
        tags = {"refinery.kind": kind, "refinery.pid": str(pid), "refinery.host": on}
        return client.create_run(first.experiment_id, tags=tags).info.run_id

    abandoned = [running("pipeline", dead.pid), running("stage", dead.pid)]
    alive = running("pipeline", os.getpid())
    elsewhere = running("stage", dead.pid, on=host + "-other")
    untagged = client.create_run(first.experiment_id, tags={"refinery.kind": "stage"}).info.run_id

    second = Lineage(uri, "refinery", tmp_path / "mlartifacts")
    parent = second.start_pipeline("data_to_model", {}, {})
    status = {r: client.get_run(r).info.status for r in (*abandoned, alive, elsewhere, untagged, parent)}
    assert [status[r] for r in abandoned] == ["KILLED", "KILLED"]
    assert "ended without closing this run" in client.get_run(abandoned[0]).data.tags["refinery.error"]
    assert status[alive] == status[elsewhere] == status[untagged] == status[parent] == "RUNNING"
    assert client.get_run(parent).data.tags["refinery.pid"] == str(os.getpid())
    second.end_pipeline()


def test_the_baseline_verdict_needs_the_margin() -> None:
    from refinery.tasks.evaluate import poor_model_warning

    assert poor_model_warning({"val_loss": 4.4, "unigram_loss": 5.0}, 0.10) is None  # 12% below
    message = poor_model_warning({"val_loss": 4.6, "unigram_loss": 5.0}, 0.10)  # 8% below
    assert message and "8.0% below the unigram baseline 5.0000" in message and "train.preset" in message
    assert poor_model_warning({"val_loss": 6.0, "unigram_loss": 5.0}, None) is None


def test_a_model_no_better_than_its_baseline_is_reported_and_not_registered(tmp_path) -> None:
    import yaml
    from mlflow.tracking import MlflowClient
    from test_lineage_graph import TINY

    sources = write_corpus(tmp_path / "corpus")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))  # two training steps: no better than token frequencies
    root = tmp_path / "run"
    result = _run(root, "--source", sources[0], "--source", sources[1], "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "warning: the model is no better than its baseline" in result.output, result.output
    assert "no model registered" in result.output and "Model registered" not in result.output
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.search_registered_models() == [] or not client.search_model_versions("name = 'refinery-lm'")
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("refinery").experiment_id])
                 if r.data.tags.get("refinery.kind") == "pipeline"]
    assert parent.data.tags["refinery.warning"].startswith("the model is no better than its baseline")
