"""One run per run root: the `<root>/.lock` flock, held by a real second process.

- a second acquisition fails at once naming the holder (pid, host, since when, its command),
  and one that waits gets the lock as soon as the holder lets go;
- a holder killed with SIGKILL leaves nothing stale: the lock is free at once;
- `refinery run` on a locked root exits with one `error:` line naming the holder and
  exit code 75, without a traceback and without touching the root; the flow's own body
  refuses the same way (a Failed state, nothing written), also after a bounded wait.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refinery.flows import pipeline  # noqa: F401 - Prefect sets up its log handlers now, not on a CliRunner stream
from refinery.flows.cli import app
from refinery.storage import lock as lock_mod
from refinery.storage.lock import EXIT_LOCKED, LOCK_NAME, RootLock, RootLocked

HOLDER = """
import sys
from refinery.storage.lock import RootLock
lock = RootLock(sys.argv[1], purpose="holder for the test")
lock.acquire(0)
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


class Holder:
    """A child process holding the root's lock until told to let go (or killed)."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


@pytest.fixture
def holder(tmp_path):
    h = Holder(tmp_path / "run")
    yield h
    h.stop()


def test_a_second_run_is_refused_at_once_naming_the_holder_and_one_that_waits_gets_the_lock(tmp_path, holder) -> None:
    root = tmp_path / "run"
    started = time.monotonic()
    with pytest.raises(RootLocked) as refused:
        RootLock(root).acquire(0)
    assert time.monotonic() - started < 2.0
    message = str(refused.value)
    assert f"pid {holder.proc.pid} on host {socket.gethostname()} since 20" in message
    assert "(holder for the test)" in message and "execution.lock_wait_s" in message
    assert refused.value.holder["pid"] == holder.proc.pid
    with pytest.raises(RootLocked, match=r"after waiting 0\.3 s"):  # a bounded wait that runs out
        RootLock(root).acquire(0.3)

    seen: list[dict] = []
    threading.Timer(0.5, holder.release).start()
    mine = RootLock(root, purpose="second")
    started = time.monotonic()
    mine.acquire(10.0, on_wait=seen.append)
    try:
        assert time.monotonic() - started < 5.0
        assert [s["pid"] for s in seen] == [holder.proc.pid]  # told once whom it waits for
        assert holder.proc.stdout.readline().strip() == "released"
        assert RootLock(root).holder()["pid"] == os.getpid()
    finally:
        mine.release()
    assert RootLock(root).holder() is None and (root / LOCK_NAME).read_text() == ""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder) -> None:
    root = tmp_path / "run"
    assert RootLock(root).holder()["pid"] == holder.proc.pid
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait()
    assert '"pid"' in (root / LOCK_NAME).read_text()  # its record is still there, the lock is not
    started = time.monotonic()
    with RootLock(root).held(0) as lock:
        assert time.monotonic() - started < 1.0
        assert lock.holder()["pid"] == os.getpid()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.name != LOCK_NAME}


def test_refinery_run_on_a_locked_root_fails_naming_the_holder_and_touches_nothing(tmp_path, holder, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "run"
    (root / "ingest").mkdir()
    (root / "ingest" / "earlier.txt").write_text("an earlier run's file\n")
    source = tmp_path / "one.txt"
    source.write_text("One small document for the ingest stage.\n")
    before = _tree(root)
    result = CliRunner().invoke(app, ["run", "--root", str(root), "--source", str(source), "--stages", "ingest",
                                      "--set", "execution.progress=false"])
    assert result.exit_code == EXIT_LOCKED, result.output
    assert result.output.startswith("error: run root ") and result.output.count("\n") == 1
    assert f"pid {holder.proc.pid}" in result.output and "in use by another run" in result.output
    assert "Traceback" not in result.output
    assert _tree(root) == before  # no stage output, no MLflow or Prefect store


def test_the_flow_itself_refuses_a_locked_root(tmp_path, holder) -> None:
    root = tmp_path / "run"
    source = tmp_path / "one.txt"
    source.write_text("One small document for the ingest stage.\n")
    config = {"execution": {"progress": False, "lock_wait_s": 0.3}}
    state = pipeline.data_to_model.fn(sources=[str(source)], root=str(root), config=config, stages=["ingest"])
    assert state.is_failed() and f"pid {holder.proc.pid}" in state.message and "after waiting 0.3 s" in state.message
    assert isinstance(state.data, RootLocked)
    assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]  # nothing created


def test_the_wait_defaults_to_none_by_hand() -> None:
    from refinery.flows.config import validate_config

    assert validate_config({}).execution.lock_wait_s is None
    assert pipeline.lock_wait_s(validate_config({})) == 0.0  # not started by a deployment: refuse at once
    assert pipeline.lock_wait_s(validate_config({"execution": {"lock_wait_s": 5}})) == 5.0


def test_without_fcntl_the_run_goes_ahead_with_a_warning(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lock_mod, "fcntl", None)
    with pytest.warns(RuntimeWarning, match="not locked"), RootLock(tmp_path / "run").held(0) as lock:
        assert lock.holder() is None
