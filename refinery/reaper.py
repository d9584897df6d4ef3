"""End the processes a command started when the command dies without ending them.

A command killed with SIGKILL runs no cleanup, so what it started keeps running:
Prefect's temporary API server (listening on a loopback port), the `prefect
server` of `refinery schedule`, the servers of `refinery ui`, Dask or torchrun
workers. The reaper is a small process of its own session that watches its
parent: while the parent lives it notes the parent's descendants every
`interval` seconds; once the parent is gone it asks each of them that still runs
to stop (SIGTERM), and kills those left after a grace period.

`psutil` identifies a process by pid and start time, so a pid reused by an
unrelated process after the last look is never signalled.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil

_started: subprocess.Popen | None = None


def start_reaper(interval: float = 0.5, grace: float = 5.0) -> subprocess.Popen:
    """Watch this process from a separate one (once per process); returns the watcher."""
    global _started
    if _started is None or _started.poll() is not None:
        _started = subprocess.Popen(
            [sys.executable, "-m", "refinery.reaper", str(os.getpid()), "--interval", str(interval),
             "--grace", str(grace)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    return _started


def watch(parent_pid: int, interval: float, grace: float) -> list[psutil.Process]:
    """Block until `parent_pid` ends, then stop its last-seen descendants; returns those that were stopped."""
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return []
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if parent.status() == psutil.STATUS_ZOMBIE:
                break
            for child in parent.children(recursive=True):
                if child.pid != me:
                    seen[child.pid] = child
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    alive = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in alive:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return alive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pid", type=int, help="the process to watch")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between looks at its descendants")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    watch(args.pid, args.interval, args.grace)


if __name__ == "__main__":
    main()
