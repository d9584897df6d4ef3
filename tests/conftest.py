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
