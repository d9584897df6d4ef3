"""`refinery serve` is the HTTP server and `refinery schedule` the cron deployment; the old names still work.

Each test drives the real command line (typer's CliRunner, no mocks) up to a
point where it stops by itself with a known error, so that reaching that error
proves which code path ran without starting a server.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from refinery.flows.cli import app

runner = CliRunner()

SCHEDULE_MOVED = "`refinery serve --source/--cron` (the schedule) is now `refinery schedule`"
SERVE_MODEL_MOVED = "`refinery serve-model` is deprecated; use `refinery serve`"


def test_schedule_help_shows_the_schedule_options() -> None:
    result = runner.invoke(app, ["schedule", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--source", "--cron", "--interval", "--config", "--set", "--name"):
        assert option in result.stdout
    assert "Prefect deployment" in result.stdout


def test_serve_help_shows_only_the_http_options() -> None:
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--model", "--host", "--port", "--int8", "--adapter"):
        assert option in result.stdout
    for hidden in ("--source", "--cron", "--interval", "--set"):
        assert hidden not in result.stdout
    assert "refinery schedule" in result.stdout


def test_top_level_help_lists_serve_and_schedule_but_not_the_old_alias() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert " serve " in result.stdout and " schedule " in result.stdout
    assert "serve-model" not in result.stdout


def test_serve_with_a_missing_model_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    result = runner.invoke(app, ["serve", "--root", str(tmp_path / "root"), "--model", str(missing)])
    assert result.exit_code == 2, result.output
    assert f"model {missing} does not exist" in result.stderr
    assert "deprecated" not in result.stderr and SCHEDULE_MOVED not in result.stderr


def test_serve_model_alias_warns_and_reaches_the_model_loader(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    result = runner.invoke(app, ["serve-model", "--root", str(tmp_path / "root"), "--model", str(missing)])
    assert result.exit_code == 2, result.output
    assert SERVE_MODEL_MOVED in result.stderr
    assert f"model {missing} does not exist" in result.stderr  # the loader's error: the server path ran
    assert result.stderr.index(SERVE_MODEL_MOVED) < result.stderr.index("does not exist")


def test_old_serve_source_form_warns_and_runs_the_schedule(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["serve", "--source", str(tmp_path), "--root", str(tmp_path / "root"), "--cron", "not a cron"]
    )
    assert result.exit_code == 2, result.output
    assert SCHEDULE_MOVED in result.stderr
    assert "--cron 'not a cron' is not a valid cron schedule" in result.stderr  # the schedule's own check


def test_old_serve_without_source_still_means_the_schedule(tmp_path: Path) -> None:
    """Any schedule-only option selects the schedule, which then asks for --source as it always did."""
    result = runner.invoke(app, ["serve", "--root", str(tmp_path / "root"), "--name", "hourly"])
    assert result.exit_code == 2, result.output
    assert SCHEDULE_MOVED in result.stderr
    assert "--source is required" in result.stderr


def test_schedule_rejects_a_bad_cron_before_contacting_prefect(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["schedule", "--source", str(tmp_path), "--root", str(tmp_path / "root"), "--cron", "61 * * * *"]
    )
    assert result.exit_code == 2, result.output
    assert "is not a valid cron schedule" in result.stderr
    assert SCHEDULE_MOVED not in result.stderr
    assert "Prefect API" not in result.stdout


def test_device_option_of_generate_and_serve() -> None:
    import torch
    from typer.testing import CliRunner

    from refinery.flows.cli import _device, app

    gpu = torch.cuda.is_available()
    assert _device("cpu") == "cpu" and _device("auto") == ("cuda" if gpu else "cpu")
    for command in ("generate", "serve"):
        assert "--device" in CliRunner().invoke(app, [command, "--help"]).output
    result = CliRunner().invoke(app, ["generate", "hi", "--device", "tpu"])
    assert result.exit_code == 2 and "--device must be auto, cpu or cuda" in result.output
    if not gpu:
        result = CliRunner().invoke(app, ["generate", "hi", "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA GPU is visible" in result.output
