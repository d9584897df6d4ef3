"""Every command finds the same model on a real MLflow tracking server, through `MLFLOW_TRACKING_URI`.

A real `mlflow server` on loopback (SQLite backend, proxied artifacts in a
temporary folder) stands in for the compose stack's server. With only the
environment variable set, `refinery run` logs and registers there (and leaves no
SQLite store in the run root), and `refinery lineage`, `refinery generate
models:/…` and `refinery serve --model models:/…` all resolve the same model
from there: the lineage shows its version, and greedy text from `generate`
equals the server's completion.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from refinery.sample_corpus import build_sample_corpus

pytestmark = pytest.mark.slow

TINY = """
tokenizer:
  vocab_size: 400
shards:
  val_fraction: 0.15
train:
  preset: test
  seq_len: 64
  micro_batch_size: 8
  tokens_per_step: 512
  max_steps: 12
  eval_every: 12
  eval_batches: 2
  checkpoint_every: 12
  warmup_steps: 2
eval:
  max_batches: 2
  max_new_tokens: 4
execution:
  progress: false
tracking:
  register_poor_models: true  # a few training steps; what is tested is the registration
"""
PROMPT = "def "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{base / 'store.db'}", "--artifacts-destination", (base / "art").as_uri(),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _env(root: Path, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.startswith("PREFECT_SERVER_")}
    env.update(PREFECT_HOME=str(root / "prefect"), PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=uri)
    return env


def _refinery(root: Path, uri: str, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "refinery", *args, "--root", str(root)], env=_env(root, uri),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"refinery {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_every_command_finds_the_model_on_the_tracking_server(tracking_server, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    corpus = build_sample_corpus(tmp_path / "corpus", size="tiny").root
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    root = tmp_path / "run"

    out = _refinery(root, tracking_server, "run", "--source", str(corpus), "--config", str(config))
    assert "Model registered in MLflow as models:/refinery-lm/1" in out, out
    assert not (root / "mlflow.db").exists()  # nothing went to the embedded store
    client = MlflowClient(tracking_uri=tracking_server)
    (mv,) = client.search_model_versions("name = 'refinery-lm'")
    train_run = client.get_run(mv.run_id)
    assert train_run.data.tags["refinery.stage"] == "train"

    # lineage: sources recalled from the server's pipeline run, the model version shown up to date
    lineage = _refinery(root, tracking_server, "lineage", "--config", str(config), "--no-log")
    assert "model refinery-lm v1  (models:/refinery-lm/1)  ✓" in lineage, lineage
    assert "Everything is up to date" in lineage, lineage

    # generate: the registered model, downloaded from the server's artifact store; greedy
    generated = _refinery(root, tracking_server, "generate", PROMPT, "--model", "models:/refinery-lm/1",
                          "--max-new-tokens", "6", "--temperature", "0")
    completion = generated.rstrip("\n").removeprefix(PROMPT)

    # serve: the same model over HTTP gives the same greedy completion
    port = _free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "refinery", "serve", "--root", str(root), "--model", "models:/refinery-lm/1",
         "--port", str(port)], env=_env(root, tracking_server), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", serve)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 - loopback
            served = json.loads(resp.read())["choices"][0]["text"]
    finally:
        _stop(serve)
    assert served.rstrip() == completion.rstrip(), (served, completion)
