"""A killed command leaves no process behind: the reaper ends what it started.

The first test uses a plain parent that starts a listening child and is then
SIGKILLed. The second kills a real `refinery run` once Prefect's temporary API
server listens, and checks that nothing listens on that port afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from refinery.reaper import start_reaper

    start_reaper(interval=0.1, grace=2.0)
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time\\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\\n"
        "print(s.getsockname()[1], flush=True)\\n"
        "time.sleep(600)\\n")], stdout=sys.stdout)
    time.sleep(600)
    """
)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except psutil.TimeoutExpired:
        return False


def test_a_sigkilled_parent_leaves_no_listening_child(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        port = int(parent.stdout.readline())
        assert _listening(port)
        child = next(c for c in psutil.Process(parent.pid).children() if "socket" in " ".join(c.cmdline()))
        time.sleep(0.3)  # the reaper has looked at least once
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait_gone(child, 15), "the child outlived its killed parent"
        assert not _listening(port)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()


def test_a_sigkilled_run_leaves_no_listening_prefect_server(tmp_path: Path) -> None:
    source = tmp_path / "docs"
    source.mkdir()
    (source / "a.txt").write_text("A short note about rivers and bridges.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    cli = Path(sys.executable).parent / "refinery"
    proc = subprocess.Popen([str(cli), "run", "--source", str(source), "--root", str(tmp_path / "run"),
                             "--stages", "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server, port = None, None
        deadline = time.monotonic() + 240
        while server is None:
            assert proc.poll() is None, "the run ended before its Prefect server was seen"
            assert time.monotonic() < deadline, "no Prefect server started within 240 s"
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    listening = [c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
                except psutil.Error:
                    continue
                if listening and "uvicorn" in " ".join(child.cmdline()):
                    server, port = child, listening[0]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_gone(server, 30), "Prefect's temporary server outlived the killed run"
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
