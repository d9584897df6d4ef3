"""Retries: a transient I/O error in a stage is retried with back-off; a bug is not.

The ingest stage task runs inside a real Prefect flow with a real executor that
loses its first batch to a connection reset (what a Dask cluster briefly out of
reach looks like). The task's retry policy must run the stage again and finish
with the same outputs as an undisturbed run, while the failed attempt stays
visible: a FAILED MLflow stage run carrying the error, and the task run's
retry count in Prefect. A non-I/O error fails at once, with its message in the
flow run's state and on the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refinery.sample_corpus import build_sample_corpus
from refinery.storage.manifest import read_manifest

CHILD = textwrap.dedent(
    """
    import concurrent.futures as cf, json, sys
    from prefect import flow
    from prefect.client.orchestration import get_client
    from mlflow.tracking import MlflowClient

    from refinery.flows.config import validate_config
    from refinery.flows.lineage import Lineage
    from prefect.utilities.annotations import quote

    from refinery.flows.pipeline import RunEnv, stage_task
    from refinery.flows.stages import PIPELINE
    from refinery.storage.layout import RunLayout

    base, corpus = sys.argv[1:]


    class FailsOnce(cf.ThreadPoolExecutor):
        # A real executor whose first submission fails, as a cluster briefly out of reach would.
        def __init__(self, error, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.error = error

        def submit(self, fn, *args, **kwargs):
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            return super().submit(fn, *args, **kwargs)


    ERRORS = {"io": lambda: ConnectionResetError("connection to the executor reset"),
              "bug": lambda: ValueError("a bug in the stage, not worth retrying")}


    @flow(name="retry_probe")
    def probe(root, kind):
        cfg = validate_config({"execution": {"progress": False}, "ingest": {"ocr": False}})
        layout = RunLayout.at(root)
        layout.create(PIPELINE.names)
        lineage = Lineage(layout.mlflow_tracking_uri, "refinery", layout.mlflow_artifacts)
        with FailsOnce(ERRORS[kind](), 2) as pool:
            env = RunEnv(PIPELINE, layout, cfg, lineage, [corpus], set(), executor=pool)
            stage_task(PIPELINE["ingest"])(quote(env), "ingest", {})


    results = {}
    for name in ERRORS:
        root = f"{base}/{name}"
        state = probe(root, name, return_state=True)
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(state.state_details.flow_run_id)
            tasks = [[t.name, t.state.name, t.run_count] for t in client.read_task_runs()
                     if t.flow_run_id == flow_run.id]
        mlflow = MlflowClient(tracking_uri=RunLayout.at(root).mlflow_tracking_uri)
        runs = mlflow.search_runs([mlflow.get_experiment_by_name("refinery").experiment_id])
        results[name] = {
            "flow": state.name, "message": state.message, "tasks": tasks,
            "mlflow": sorted([r.info.status, r.data.tags.get("refinery.error", "")[-300:]] for r in runs),
        }
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[dict, str, Path, Path]:
    """Both probes in one process, so Prefect's temporary server starts once."""
    base = tmp_path_factory.mktemp("ops-retry")
    corpus = build_sample_corpus(base / "corpus", size="tiny").root
    script = base / "probe.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.startswith("PREFECT_SERVER_")}
    env.update(PREFECT_HOME=str(base / "prefect"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script), str(base), str(corpus)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr, base, corpus


def test_transient_io_error_is_retried_to_success(probed, tmp_path: Path) -> None:
    results, _, base, corpus = probed
    result = results["io"]
    assert result["flow"] == "Completed", result
    assert len(result["tasks"]) == 1 and result["tasks"][0][1:] == ["Completed", 2], result["tasks"]  # one retry
    statuses = [status for status, _ in result["mlflow"]]
    assert sorted(statuses) == ["FAILED", "FINISHED"], result["mlflow"]
    failed = next(err for status, err in result["mlflow"] if status == "FAILED")
    assert "ConnectionResetError" in failed

    # The retried stage's outputs equal those of a run that never failed.
    from refinery.tasks.ingest import IngestConfig, run_ingest

    clean = run_ingest([str(corpus)], tmp_path / "clean", IngestConfig(ocr=False), progress=False)
    manifest = read_manifest(base / "io" / "ingest")
    assert manifest is not None
    assert [(o.path, o.rows, o.sha256) for o in manifest.outputs] == [(o.path, o.rows, o.sha256) for o in clean.outputs]
    assert manifest.counts == clean.counts


def test_a_bug_fails_at_once_with_its_message(probed) -> None:
    results, terminal, base, _ = probed
    result = results["bug"]
    assert result["flow"] == "Failed", result
    assert len(result["tasks"]) == 1 and result["tasks"][0][1:] == ["Failed", 1], result["tasks"]
    assert "a bug in the stage" in result["message"]
    assert "a bug in the stage" in terminal
    assert [status for status, _ in result["mlflow"]] == ["FAILED"]
    assert read_manifest(base / "bug" / "ingest") is None
