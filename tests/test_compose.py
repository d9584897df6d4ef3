"""The compose stack is safe to run for real: health-checked, no secrets on command lines, OCR complete.

Static checks, everywhere: `docker-compose.yml` parses; every long-running service
has a health check its image can run (the project image has Python, not curl), and
whatever depends on one waits for `service_healthy`; no `command` or `entrypoint`
holds a password, a key or `user:password@` credentials (a command line is visible
to `ps` and in `docker inspect`); the image installs Tesseract and poppler (whose
`pdftoppm` renders scanned PDF pages for OCR).

The stack test, where Docker with its compose plugin and a reachable daemon are
present (skipped otherwise, saying which is missing): `docker compose up -d --wait`
with throwaway secrets, the tiny pipeline run inside the worker against the Prefect
and MLflow servers, the run checked through MLflow's API, and `down -v` in any case.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# A secret on a command line: a URL with `user:password@`, a secret-looking variable, a password flag.
CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
SECRET_WORD = re.compile(r"(?i)password|passwd|secret|access[_-]?key|api[_-]?key|token|\$\{?\w*_KEY\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def one_shot(services: dict[str, Any]) -> set[str]:
    """Services others wait to complete (`service_completed_successfully`): they run once and exit."""
    return {dep for s in services.values() for dep, how in (s.get("depends_on") or {}).items()
            if isinstance(how, dict) and how.get("condition") == "service_completed_successfully"}


def command_lines(service: dict[str, Any]) -> list[str]:
    """The service's `command` and `entrypoint`, each as one string."""
    parts = [service.get(k) for k in ("command", "entrypoint")]
    return [" ".join(p) if isinstance(p, list) else str(p) for p in parts if p]


def secret_on_command_line(line: str) -> str | None:
    """What in `line` looks like a secret, or None."""
    if m := CREDENTIALS.search(line):
        return m.group(0)
    if m := SECRET_WORD.search(line):
        return m.group(0)
    return None


def test_the_compose_file_parses(compose) -> None:
    assert isinstance(compose, dict) and compose["services"]
    assert all(isinstance(s, dict) for s in compose["services"].values())


def test_every_long_running_service_is_health_checked(compose) -> None:
    services = compose["services"]
    assert one_shot(services) == {"create-buckets"}
    for name, service in services.items():
        if name in one_shot(services):
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        if "build" in service:  # the project image (python:*-slim): no curl or wget there
            test = " ".join(check["test"]) if isinstance(check["test"], list) else check["test"]
            assert "curl" not in test and "wget" not in test, (name, test)
            assert "python" in test, (name, test)


def test_services_wait_for_their_dependencies_to_be_healthy(compose) -> None:
    services = compose["services"]
    assert services["prefect-worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dep, how in depends.items():
            wanted = "service_completed_successfully" if dep in one_shot(services) else "service_healthy"
            assert how.get("condition") == wanted, (name, dep, how)


@pytest.mark.parametrize("line", [
    "mlflow server --backend-store-uri postgresql://refinery:${POSTGRES_PASSWORD}@postgres:5432/mlflow",
    "mlflow server --backend-store-uri postgresql://refinery:hunter2@postgres/mlflow",
    'sh -c "mc alias set local http://minio:9000 $${MINIO_ROOT_USER} $${MINIO_ROOT_PASSWORD}"',
    "tool --aws-secret-access-key abc",
    "tool --key $${AWS_ACCESS_KEY_ID}",
])
def test_the_secret_check_catches_secrets(line: str) -> None:
    assert secret_on_command_line(line)


def test_no_secret_on_any_command_line(compose) -> None:
    for name, service in compose["services"].items():
        for line in command_lines(service):
            assert secret_on_command_line(line) is None, f"{name}: {secret_on_command_line(line)!r} in {line!r}"
    mlflow = compose["services"]["mlflow"]
    assert "--backend-store-uri" not in " ".join(command_lines(mlflow))
    assert "MLFLOW_BACKEND_STORE_URI" in mlflow["environment"]  # read by `mlflow server` from the environment


def test_the_image_installs_tesseract_and_poppler() -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = " ".join(line for line in text.splitlines() if line.startswith("RUN") and "apt-get install" in line)
    for package in ("tesseract-ocr", "poppler-utils"):
        assert re.search(rf"\b{package}\b", installs), f"{package} is not installed by {DOCKERFILE.name}"


# -- the stack itself, where Docker can run it ----------------------------------------------------

STACK_WAIT_S = 1200  # the first `up` builds the project image (torch, mlflow, prefect)
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
  max_steps: 10
  eval_every: 10
  eval_batches: 2
  checkpoint_every: 10
  warmup_steps: 2
eval:
  max_batches: 2
  max_new_tokens: 4
execution:
  progress: false
"""


def docker_unavailable() -> str | None:
    """Why the stack can't be brought up here, or None."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not on PATH"
    try:
        if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode != 0:
            return "the docker compose plugin is not installed"
        if subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
            return "the Docker daemon is not reachable (`docker info` failed)"
    except subprocess.TimeoutExpired:
        return "the Docker daemon is not reachable (`docker info` timed out)"
    return None


def _must(cmd: list[str], timeout: float, logs: list[str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        tail = subprocess.run(logs, capture_output=True, text=True, timeout=120).stdout[-6000:] if logs else ""
        pytest.fail(f"{' '.join(cmd[-6:])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}\n{tail}")
    return proc.stdout


def test_the_stack_test_says_why_it_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert docker_unavailable() == "docker is not on PATH"
    fake = tmp_path / "docker"  # a client whose compose plugin works but whose daemon does not answer
    fake.write_text('#!/bin/sh\n[ "$1" = compose ] && exit 0\necho "Cannot connect to the Docker daemon" >&2\nexit 1\n')
    fake.chmod(0o755)
    assert docker_unavailable() == "the Docker daemon is not reachable (`docker info` failed)"
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert docker_unavailable() == "the docker compose plugin is not installed"


@pytest.mark.slow
@pytest.mark.timeout(STACK_WAIT_S + 1200)
def test_the_stack_comes_up_runs_the_pipeline_and_goes_down(tmp_path: Path) -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"compose stack test skipped: {reason}")
    from mlflow.tracking import MlflowClient

    from refinery.sample_corpus import build_sample_corpus

    incoming = tmp_path / "incoming"
    build_sample_corpus(incoming / "corpus", size="tiny")
    (incoming / "tiny.yaml").write_text(TINY)
    env_file = tmp_path / "stack.env"  # throwaway secrets, URL-safe as .env.example asks
    env_file.write_text(f"POSTGRES_USER=refinery\nPOSTGRES_PASSWORD={secrets.token_urlsafe(18)}\n"
                        f"MINIO_ROOT_USER=refinery\nMINIO_ROOT_PASSWORD={secrets.token_urlsafe(18)}\n"
                        f"REFINERY_INCOMING={incoming}\n")
    compose = [shutil.which("docker") or "docker", "compose", "-p", f"refinery-test-{secrets.token_hex(4)}",
               "--env-file", str(env_file), "-f", str(COMPOSE)]
    logs = [*compose, "logs", "--no-color", "--tail", "80"]
    try:
        _must([*compose, "up", "-d", "--build", "--wait", "--wait-timeout", str(STACK_WAIT_S)], STACK_WAIT_S + 60, logs)
        _must([*compose, "exec", "-T", "prefect-worker", "sh", "-c", "tesseract --version && pdftoppm -v"], 60)
        _must([*compose, "exec", "-T", "prefect-worker", "refinery", "run", "--source", "/data/incoming/corpus",
               "--root", "/data/runs/stack-test", "--config", "/data/incoming/tiny.yaml"], 900, logs)
        client = MlflowClient(tracking_uri="http://127.0.0.1:5000")  # the published port, as a user sees it
        experiment = client.get_experiment_by_name("refinery")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        pipeline_runs = [r for r in runs if r.data.tags.get("refinery.kind") == "pipeline"]
        assert [r.info.status for r in pipeline_runs] == ["FINISHED"]
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], capture_output=True, timeout=300, cwd=REPO)
