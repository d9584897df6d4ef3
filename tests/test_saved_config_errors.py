"""A run root's saved config edited by hand or damaged is one clear error, not a traceback.

Through the real command line (typer's CliRunner): a stage's `manifest.json` that is not
JSON, or is JSON that fails validation, and a checkpoint's `config.json` that is not JSON,
make `refinery run`, `refinery inspect` and `refinery lineage` print the file, what is wrong
and what to do, and exit with code 2 before any work starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_lineage_graph import TINY, run_chain, write_corpus
from typer.testing import CliRunner

from refinery.flows.cli import app
from refinery.flows.config import validate_config
from refinery.model.checkpoint import CheckpointConfigError, read_config
from refinery.storage.manifest import ManifestError, read_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A run root holding a completed ingest stage (no Prefect, no MLflow), and its sources."""
    base = tmp_path_factory.mktemp("saved")
    sources = write_corpus(base / "corpus")
    run_chain(base / "run", sources, validate_config(TINY), stages=("ingest",))
    return base / "run", sources


@pytest.fixture
def root(made: tuple[Path, list[str]], tmp_path: Path) -> Path:
    """A fresh copy of the run root for one test to damage."""
    return Path(shutil.copytree(made[0], tmp_path / "run"))


def _clean_failure(result, path: Path) -> None:  # noqa: ANN001 (click's Result)
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and "edited or damaged" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # typer.Exit, not a crash


def test_a_manifest_that_is_not_json_names_the_file(root: Path, made) -> None:
    manifest = root / "ingest" / "manifest.json"
    manifest.write_text('{"stage": "ingest", broken')
    with pytest.raises(ManifestError, match="not a valid stage manifest: Invalid JSON"):
        read_manifest(manifest.parent)
    inspect = runner.invoke(app, ["inspect", "--root", str(root)])
    _clean_failure(inspect, manifest)
    lineage = runner.invoke(app, ["lineage", "--root", str(root), "--no-log"])
    _clean_failure(lineage, manifest)


def test_a_manifest_that_fails_validation_says_which_field(root: Path, made) -> None:
    manifest = root / "ingest" / "manifest.json"
    tree = json.loads(manifest.read_text())
    tree["counts"] = "many"
    manifest.write_text(json.dumps(tree))
    result = runner.invoke(app, ["inspect", "select 1", "--root", str(root)])
    _clean_failure(result, manifest)
    assert "counts" in result.output and "re-runs the ingest stage" in result.output


def test_run_stops_before_the_flow_on_a_damaged_manifest(root: Path, made) -> None:
    manifest = root / "ingest" / "manifest.json"
    manifest.write_bytes(b"\xff\xfe not even text")
    result = runner.invoke(app, ["run", "--root", str(root), "--source", made[1][0], "--stages", "ingest",
                                 "--set", "execution.progress=false"])
    _clean_failure(result, manifest)
    assert not (root / "prefect").exists()  # stopped before Prefect started


def test_run_stops_on_a_damaged_checkpoint_config(root: Path, made) -> None:
    checkpoint = root / "train" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text('{"model": {"n_layer": 2,')
    with pytest.raises(CheckpointConfigError, match="not valid JSON"):
        read_config(checkpoint)
    result = runner.invoke(app, ["run", "--root", str(root), "--source", made[1][0], "--stages", "ingest",
                                 "--set", "execution.progress=false"])
    _clean_failure(result, checkpoint / "config.json")
    assert "train from scratch" in result.output


def test_generate_names_a_damaged_train_manifest(root: Path) -> None:
    manifest = root / "train" / "manifest.json"
    manifest.parent.mkdir(exist_ok=True)
    manifest.write_text("[]")
    result = runner.invoke(app, ["generate", "Once", "--root", str(root)])
    _clean_failure(result, manifest)
