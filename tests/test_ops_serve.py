"""`refinery schedule`: the pipeline as a scheduled Prefect deployment.

Against a real `prefect server` on loopback (SQLite, in a temporary home), the
test starts `refinery schedule` with a cron schedule, reads the deployment back
through the Prefect API (schedule, parameters), then triggers it twice over a
growing source folder: both runs complete, and the second parses only the new
file. The triggered runs are limited to the first two stages to stay quick.

With no Prefect API to talk to, `refinery schedule` starts its own server for the
run root: a run made by the interval schedule itself (not triggered by hand)
completes, and stopping the schedule with SIGTERM stops that server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from refinery.sample_corpus import build_sample_corpus
from refinery.storage.manifest import read_manifest

pytestmark = pytest.mark.slow

CRON = "17 3 * * *"

QUERY = textwrap.dedent(
    """
    import json, sys
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    action = sys.argv[1]
    if action == "deployment":
        with get_client(sync_client=True) as c:
            d = c.read_deployment_by_name("data_to_model/scheduled")
            print(json.dumps({"name": d.name, "crons": [getattr(s.schedule, "cron", None) for s in d.schedules],
                              "active": [s.active for s in d.schedules], "parameters": d.parameters}))
    else:
        run = run_deployment("data_to_model/scheduled", parameters={"stages": ["ingest", "dedup"]}, timeout=400)
        print(json.dumps({"state": run.state.name, "message": run.state.message}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("ops-serve")
    corpus = build_sample_corpus(base / "corpus", size="tiny").root
    src = base / "src"
    shutil.copytree(corpus, src, ignore=shutil.ignore_patterns("*.md"))
    config = base / "tiny.yaml"
    config.write_text("execution:\n  progress: false\n")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.startswith("PREFECT_SERVER_")}
    env.update(PREFECT_HOME=str(base / "prefect-home"), PREFECT_API_URL=api, PYTHONUNBUFFERED="1")
    bin_dir = Path(sys.executable).parent
    logs = {name: base / f"{name}.log" for name in ("server", "serve")}
    procs: list[subprocess.Popen] = []
    try:
        with open(logs["server"], "w") as out:
            procs.append(subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                           "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(api + "/health", timeout=2):
                    break
            except OSError:
                assert procs[0].poll() is None, logs["server"].read_text()[-3000:]
                assert time.monotonic() < deadline, "prefect server did not start"
                time.sleep(0.5)
        root = base / "run"
        with open(logs["serve"], "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "refinery", "schedule", "--source", str(src), "--root", str(root),
                 "--config", str(config), "--cron", CRON, "--name", "scheduled"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        yield env, src, corpus, root, base, procs[1], logs["serve"]
    finally:
        for p in reversed(procs):
            _stop(p)


def _query(env: dict[str, str], base: Path, action: str) -> dict:
    script = base / "query.py"
    script.write_text(QUERY)
    proc = subprocess.run([sys.executable, str(script), action], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_schedule_registers_the_deployment_with_its_schedule(served) -> None:
    env, src, _, root, base, serve_proc, serve_log = served
    deadline = time.monotonic() + 180
    while True:
        assert serve_proc.poll() is None, serve_log.read_text()[-3000:]
        try:
            deployment = _query(env, base, "deployment")
            break
        except AssertionError:
            assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(2)
    assert deployment["name"] == "scheduled"
    assert deployment["crons"] == [CRON] and deployment["active"] == [True]
    assert deployment["parameters"]["sources"] == [str(src.resolve())]
    assert deployment["parameters"]["root"] == str(root.resolve())
    assert deployment["parameters"]["config"]["execution"]["progress"] is False


def test_triggered_runs_complete_and_process_only_what_is_new(served) -> None:
    env, src, corpus, root, base, _, serve_log = served
    first = _query(env, base, "run")
    assert first["state"] == "Completed", (first, serve_log.read_text()[-3000:])
    before = read_manifest(root / "ingest")
    assert before is not None and read_manifest(root / "dedup") is not None

    # One new file arrives in the watched folder; the next run parses it alone.
    new = next(p for p in sorted(corpus.rglob("*.md")))
    shutil.copy(new, src / new.name)
    second = _query(env, base, "run")
    assert second["state"] == "Completed", (second, serve_log.read_text()[-3000:])
    after = read_manifest(root / "ingest")
    assert after.metrics["files_new"] == 1
    assert after.metrics["files_unchanged"] == before.metrics["files"]
    assert after.counts.kept > before.counts.kept
    assert read_manifest(root / "dedup").input_digest == after.output_digest


def _api_json(url: str, body: dict | None = None) -> dict | list:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _answers(api: str) -> bool:
    try:
        with urllib.request.urlopen(api + "/health", timeout=2):
            return True
    except OSError:
        return False


def test_interval_schedule_starts_its_own_server_and_a_scheduled_run_completes(tmp_path) -> None:
    if _answers("http://127.0.0.1:4200/api"):
        pytest.skip("a Prefect server already answers on 127.0.0.1:4200; `refinery schedule` would use it")
    src = build_sample_corpus(tmp_path / "corpus", size="tiny").root
    root = tmp_path / "run"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.startswith("PREFECT_SERVER_")}
    # The server's scheduler and the runner's polling at a test's pace (defaults: 60 s and 10 s).
    env.update(PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_RUNNER_POLL_FREQUENCY="2",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "schedule.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refinery", "schedule", "--source", str(src), "--root", str(root),
             "--interval", "3", "--stages", "ingest,dedup", "--prefect-port", str(port),
             "--set", "execution.progress=false"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        done = None
        while done is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
            try:
                deployment = _api_json(f"{api}/deployments/name/data_to_model/scheduled")
                runs = _api_json(f"{api}/flow_runs/filter",
                                 {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
            except OSError:
                continue
            done = next((r for r in runs if r["state_type"] == "COMPLETED"), None)
        text = log.read_text()
        assert "starting a Prefect server" in text and f"http://127.0.0.1:{port}/runs" in text, text[-3000:]
        # Made by the schedule, not by hand: the server's scheduler created it from the deployment's schedule.
        assert done["auto_scheduled"] is True and done["deployment_id"] == deployment["id"]
        assert done["parameters"]["stages"] == ["ingest", "dedup"]
        [sched] = deployment["schedules"]
        assert sched["active"] is True and sched["schedule"]["interval"] in (3, 3.0, "PT3S")
        assert read_manifest(root / "ingest") is not None and read_manifest(root / "dedup") is not None
        assert (root / "prefect" / "server.log").is_file()
    finally:
        _stop(proc)
    assert proc.returncode is not None
    assert "the Prefect server is stopped" in log.read_text(), log.read_text()[-3000:]
    assert not _answers(api)
