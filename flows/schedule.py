"""Scheduled runs: `data_to_model` served as a Prefect deployment with a cron or interval schedule.

`refinery schedule` keeps a process that polls the Prefect API and starts each
scheduled (or manually triggered) run. Prefect's temporary in-process server
cannot hold schedules, so when no API answers, a persistent `prefect server`
is started for the run root (its database in `<root>/prefect`, the same one
`refinery ui` reads) and stopped with the schedule. For a team setup with work
pools and workers, see `prefect.yaml` at the repository root.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_API = "http://127.0.0.1:4200/api"
DEFAULT_PORT = 4200
SERVER_LOG = "server.log"


def api_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310 - loopback or user-given
            return resp.status == 200
    except OSError:
        return False


def use_api(url: str) -> None:
    """Point this process (and the flow runs it starts) at `url`, even if Prefect is already imported."""
    os.environ["PREFECT_API_URL"] = url
    context = sys.modules.get("prefect.context")
    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:  # Prefect read its settings at import; make it read them again
        refresh()


def choose_api() -> str | None:
    """The Prefect API to serve against: PREFECT_API_URL, else a local server on :4200 if one runs."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if api_answers(DEFAULT_API):
        use_api(DEFAULT_API)
        return DEFAULT_API
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def local_server(prefect_home: Path, port: int = DEFAULT_PORT, timeout_s: float = 240.0) -> Iterator[str]:
    """A `prefect server` on loopback over `prefect_home`, for as long as the block runs; yields its API URL.

    The server runs in its own process group, so that stopping it stops its
    workers too; its output goes to `<prefect_home>/server.log`. `port` is used
    when free, else any free port. Raises RuntimeError when it does not answer
    within `timeout_s` (a busy 2-core machine needs tens of seconds).
    """
    from refinery.flows.ui import environment
    from refinery.storage.layout import RunLayout

    if not _port_free(port):
        port = _any_free_port()
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = environment(RunLayout.at(prefect_home.parent))
    env["PREFECT_HOME"] = str(prefect_home)
    env.pop("PREFECT_API_URL", None)
    api = f"http://127.0.0.1:{port}/api"
    log = prefect_home / SERVER_LOG
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not api_answers(api, timeout=2.0):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the Prefect server exited (code {proc.returncode}); its log {log} ends:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not answer on {api} within {timeout_s:.0f}s; see {log}")
            time.sleep(0.5)
        yield api
    finally:
        stop_server(proc)


def check_cron(cron: str) -> None:
    """Raise ValueError for a cron string Prefect would reject, before any server is contacted."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError as exc:
        raise ValueError(f"--cron {cron!r} is not a valid cron schedule, e.g. '0 * * * *' for hourly") from exc


def serve_deployment(
    name: str, cron: str | None, interval_s: float | None, parameters: dict[str, Any], limit: int = 1
) -> None:
    """Register the deployment with its schedule and run its flow runs until interrupted."""
    from prefect.flows import EntrypointType

    from refinery.flows.pipeline import data_to_model

    data_to_model.serve(
        name=name,
        cron=cron,
        interval=interval_s,
        parameters=parameters,
        description="Refinery: raw documents to a trained model, on a schedule; unchanged stages are skipped.",
        tags=["refinery"],
        limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
