"""The team topology without Docker: PostgreSQL behind both a Prefect server and an MLflow server.

The test starts its own PostgreSQL cluster (a temporary data directory, loopback,
a free port), a `prefect server` and an `mlflow server` on it (artifacts on local
disk), runs the tiny pipeline through the real CLI pointed at both servers, then
checks through both APIs that the flow run and the MLflow runs are there, and in
PostgreSQL's own tables that this is where they landed. Everything it starts is
stopped at the end.

Skipped, with the reason, where PostgreSQL's server binaries or the database
drivers (asyncpg for Prefect, psycopg2 for MLflow) are not installed;
`scripts/ci_services.sh` installs them where it can.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from refinery.flows.stages import PIPELINE
from refinery.sample_corpus import build_sample_corpus
from refinery.storage.manifest import read_manifest

STAGES = PIPELINE.names

pytestmark = pytest.mark.slow

TINY = """
tokenizer:
  vocab_size: 512
shards:
  val_fraction: 0.15
train:
  preset: test
  seq_len: 64
  micro_batch_size: 8
  tokens_per_step: 512
  max_steps: 20
  eval_every: 10
  eval_batches: 2
  checkpoint_every: 10
  warmup_steps: 2
eval:
  max_batches: 2
  max_new_tokens: 4
execution:
  progress: false
tracking:
  register_poor_models: true  # a few training steps; what is tested is the registration
"""


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _missing() -> str | None:
    if _pg_bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql, or run scripts/ci_services.sh)"
    for module, package in (("asyncpg", "asyncpg"), ("psycopg2", "psycopg2-binary")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed (pip install {package}, or run scripts/ci_services.sh)"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _user_exists("postgres") is False):
        return "running as root without a 'postgres' user to run the server as"
    return None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: server exited early:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (run as the `postgres` user when we are root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = _free_port()
        # Not under pytest's private temp folder: the server's user must be able to reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="refinery-pg-"))
        self.data = self.dir / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")

    def _cmd(self, name: str, *args: str) -> None:
        proc = subprocess.run([*self.as_user, str(self.bindir / name), *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    def start(self) -> None:
        self._cmd("initdb", "-D", str(self.data), "-U", "refinery", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} -c fsync=off"
        self._cmd("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "postgres.log"), "-w", "start")
        for db in ("prefect", "mlflow"):
            self._cmd("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "refinery", db)

    def url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://refinery@127.0.0.1:{self.port}/{db}"

    def query(self, db: str, sql: str) -> str:
        proc = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "refinery",
                               "-d", db, "-At", "-c", sql], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(f"PostgreSQL end-to-end test skipped: {reason}")
    base = tmp_path_factory.mktemp("ops-postgres")
    pg = Postgres(_pg_bindir())  # type: ignore[arg-type]
    procs: list[subprocess.Popen] = []
    try:
        pg.start()
        bin_dir = Path(sys.executable).parent
        prefect_port, mlflow_port = _free_port(), _free_port()
        prefect_env = {**_clean_env(base / "prefect-server-home"),
                       "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "postgresql+asyncpg")}
        prefect_log, mlflow_log = base / "prefect.log", base / "mlflow.log"
        with open(prefect_log, "w") as out:
            procs.append(subprocess.Popen(
                [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                env=prefect_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        with open(mlflow_log, "w") as out:
            procs.append(subprocess.Popen(
                [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--backend-store-uri", pg.url("mlflow"), "--artifacts-destination", (base / "artifacts").as_uri(),
                 "--workers", "1"],
                env=_clean_env(base / "unused"), stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        prefect_api, mlflow_uri = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
        _wait_http(prefect_api + "/health", procs[0], prefect_log)
        _wait_http(mlflow_uri + "/health", procs[1], mlflow_log)
        yield pg, prefect_api, mlflow_uri, base
    finally:
        for p in procs:
            _stop(p)
        pg.stop()


@pytest.fixture(scope="module")
def pipeline_run(services):
    pg, prefect_api, mlflow_uri, base = services
    corpus = build_sample_corpus(base / "corpus", size="tiny").root
    config = base / "tiny.yaml"
    config.write_text(TINY)
    root = base / "run"
    env = {**_clean_env(root / "prefect"), "PREFECT_API_URL": prefect_api}
    cmd = [sys.executable, "-m", "refinery", "run", "--source", str(corpus), "--root", str(root), "--config",
           str(config), "--set", f"tracking.mlflow_uri={mlflow_uri}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"refinery run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return root, env


def test_flow_run_is_recorded_by_the_prefect_server_in_postgres(services, pipeline_run) -> None:
    pg, _, _, _ = services
    _, env = pipeline_run
    script = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        flows = await c.read_flow_runs()
        tasks = await c.read_task_runs()
        print(json.dumps({"flows": [[f.name, f.state.name, str(f.id)] for f in flows],
                          "tasks": [[t.name, t.state.name] for t in tasks]}))
asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f[1] for f in data["flows"]] == ["Completed"]
    assert sorted(t[0].rsplit("-", 1)[0] for t in data["tasks"]) == sorted(STAGES)
    # ... and the server keeps them in PostgreSQL.
    flow_id = data["flows"][0][2]
    assert pg.query("prefect", f"select state_name from flow_run where id = '{flow_id}'") == "Completed"
    assert int(pg.query("prefect", f"select count(*) from task_run where flow_run_id = '{flow_id}'")) == len(STAGES)


def test_mlflow_runs_and_model_are_recorded_by_the_tracking_server_in_postgres(services, pipeline_run) -> None:
    from mlflow.tracking import MlflowClient

    pg, _, mlflow_uri, _ = services
    root, _ = pipeline_run
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("refinery")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("refinery.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stages = {r.data.tags["refinery.stage"]: r for r in runs if r.data.tags.get("refinery.kind") == "stage"}
    assert set(stages) == set(STAGES)
    for stage in STAGES:
        assert stages[stage].data.tags["refinery.output_digest"] == read_manifest(root / stage).output_digest
    assert len(client.get_metric_history(stages["train"].info.run_id, "loss")) >= 5
    assert len(client.search_model_versions("name = 'refinery-lm'")) == 1
    # ... and the server keeps them in PostgreSQL.
    in_pg = set(pg.query("mlflow", "select run_uuid from runs").split())
    assert {r.info.run_id for r in runs} <= in_pg
    assert pg.query("mlflow", "select count(*) from model_versions where name = 'refinery-lm'") == "1"
