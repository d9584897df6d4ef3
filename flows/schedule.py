"""Scheduled runs: `data_to_model` served as a Prefect deployment with a cron schedule.

`refinery schedule` keeps a process that polls the Prefect API and starts each
scheduled (or manually triggered) run. For a team setup with work pools and
workers, see `prefect.yaml` at the repository root.
"""

from __future__ import annotations

import os
import urllib.request
from typing import Any

DEFAULT_API = "http://127.0.0.1:4200/api"


def api_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310 - loopback or user-given
            return resp.status == 200
    except OSError:
        return False


def choose_api() -> str | None:
    """The Prefect API to serve against: PREFECT_API_URL, else a local server on :4200 if one runs."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if api_answers(DEFAULT_API):
        os.environ["PREFECT_API_URL"] = DEFAULT_API
        return DEFAULT_API
    return None


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
