"""Process environment for an offline, self-contained run.

Must run before Prefect or MLflow is imported: both read their settings from
the environment at import time. Values already set by the user win.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    # Telemetry tries the network; offline it logs errors (and, for Prefect's
    # local server, can lock the SQLite database).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "true",
    # Prefect's temporary local server needs a little longer on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    # MLflow's per-file download bars would interleave with the pipeline's own progress.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def configure_environment(root: str | os.PathLike[str]) -> None:
    """Keep Prefect's SQLite database with the run root, and switch off telemetry."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(root).expanduser().resolve() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
