"""The multi-service setup in `docker-compose.yml`: the services the operations guide documents.

`docker compose config` validates the file where the Docker client and its
compose plugin are installed (skipped otherwise). The structural checks need
no Docker: PostgreSQL with a health check and a volume, Prefect server and
MLflow on PostgreSQL, MinIO with its buckets created at start, a worker on the
project image, secrets only from `.env`, and only the UIs published, on
loopback.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_their_backends(compose) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "create-buckets", "prefect-server", "prefect-worker", "mlflow"} <= set(services)
    pg = services["postgres"]
    assert "healthcheck" in pg and any("/var/lib/postgresql/data" in v for v in pg["volumes"])
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")  # not on the command line
    assert "--artifacts-destination s3://" in mlflow["command"]
    assert "mc mb" in services["create-buckets"]["entrypoint"]
    assert services["prefect-worker"].get("build") or services["prefect-worker"].get("image")
    assert "worker start" in services["prefect-worker"]["command"]
    # services that need the database wait until it is healthy
    for name in ("prefect-server", "mlflow"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["prefect-worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_only_the_uis_are_published_on_loopback(compose) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert set(published) <= {"prefect-server", "mlflow", "minio"}, published
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_secrets_come_from_the_env_file() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = dict(
        line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert used <= set(example), used - set(example)
    assert not re.search(r"PASSWORD:\s*[\"']?(?!\$\{)\w", text), "a literal password in docker-compose.yml"


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the Docker client is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the Docker compose plugin is not installed")
    proc = subprocess.run([docker, "compose", "--env-file", str(REPO / ".env.example"), "-f", str(COMPOSE), "config",
                           "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
