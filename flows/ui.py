"""Start the Prefect and MLflow UIs on loopback, pointed at a run root's stores.

MLflow's store is the one every command resolves (`RunLayout.tracking_uri`).
When that is a tracking server (http or https), the server already has a UI and
is where the runs went, so no local `mlflow ui` is started over the root's
SQLite file, which would show an empty or stale store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refinery.storage.layout import RunLayout


def tracking_server(layout: RunLayout) -> str | None:
    """The MLflow tracking server's URL when runs are tracked on one, else None (a local store)."""
    uri = layout.tracking_uri()
    return uri if uri.startswith(("http://", "https://")) else None


def commands(layout: RunLayout, prefect_port: int, mlflow_port: int) -> dict[str, list[str]]:
    """The server commands to start: Prefect always, MLflow only over a local store."""
    bin_dir = Path(sys.executable).parent
    cmds = {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
    }
    if tracking_server(layout) is None:
        cmds["mlflow"] = [
            str(bin_dir / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--backend-store-uri", layout.tracking_uri(),
            "--default-artifact-root", layout.mlflow_artifacts.as_uri(),
        ]  # fmt: skip
    return cmds


def environment(layout: RunLayout) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(layout.prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
    )
    return env


def start(layout: RunLayout, prefect_port: int = 4200, mlflow_port: int = 5000) -> list[subprocess.Popen]:
    """Start the servers of `commands`, each in its own process group so that stopping them stops their children."""
    env = environment(layout)
    return [
        subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for cmd in commands(layout, prefect_port, mlflow_port).values()
    ]


def stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop each server's process group: SIGTERM, then SIGKILL for whatever is left after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C (so `finally` blocks stop child servers); restores the old handler."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
