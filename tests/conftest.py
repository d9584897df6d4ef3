"""Test-wide environment: offline, telemetry off, Prefect's database in a temporary home.

Set before any test module imports Prefect or MLflow, which read these at import.
"""

from __future__ import annotations

import os
import tempfile

_home = tempfile.mkdtemp(prefix="refinery-tests-prefect-")
os.environ.setdefault("PREFECT_HOME", _home)
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(key, value)


import pytest  # noqa: E402


@pytest.fixture
def torch_one_thread():
    """Run a test with torch on one thread (restored after): tiny matmuls are fastest that way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Files whose tests take the longest, longest first. `make test` runs the suite on two workers with
# `--dist loadfile`, which hands out whole files in collection order: starting these first keeps one
# worker from finishing alone with a long file at the end.
LONGEST_FIRST = (
    "test_pipeline_e2e.py",
    "test_tracking_server.py",
    "test_ops_serve.py",
    "test_ops_dask.py",
    "test_ops_resume.py",
    "test_ops_retry.py",
    "test_ops_postgres.py",
    "test_reaper.py",
    "test_incremental_equals_fresh.py",
    "test_early_errors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
