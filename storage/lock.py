"""One pipeline run per run root at a time: an exclusive `flock` on `<root>/.lock`.

Two runs writing one root at once race on the stages' work folders and can leave
a manifest that does not describe the files beside it. The lock is taken with
`fcntl.flock`, which the kernel drops when the holding process exits in any way
(SIGKILL included), so a killed run never leaves a stale lock behind and there
are no pid files to second-guess. The lock file is never deleted (deleting it
would let two processes lock two different inodes under one name); while held,
it holds a JSON record of its holder (pid, host, start time, command, flow run),
so a refused run can say who is in the way. Where `fcntl` is missing (Windows),
locking is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
EXIT_LOCKED = 75  # EX_TEMPFAIL (sysexits.h): busy now, try again later; lets a wrapper tell "busy" from "failed"


class RootLocked(RuntimeError):
    """The run root is locked by another run; the message names the holder."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe_holder(holder: dict[str, Any] | None) -> str:
    """`pid 123 on host h since 2026-01-01 10:00:00 UTC (refinery run ...)`, or a plain fallback."""
    if not holder:
        return "another process (it has not written its record yet)"
    since = holder.get("started_at")
    when = (datetime.fromtimestamp(float(since), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            if isinstance(since, (int, float)) else "an unknown time")
    what = [w for w in (holder.get("command"), holder.get("flow_run") and f"flow run {holder['flow_run']!r}") if w]
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}" + (
        f" ({'; '.join(what)})" if what else "")


class RootLock:
    """The exclusive lock of one run root; a context manager (`with RootLock(root).held(wait_s):`)."""

    def __init__(self, root: str | os.PathLike[str], purpose: str = "") -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
        self.purpose = purpose or " ".join(argv)
        self._fd: int | None = None

    def _try_lock(self) -> int | None:
        """The locked file descriptor, or None when another process holds the lock."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when nobody holds the lock (a cheap probe before a run starts).

        A holder that has just taken the lock may not have written its record yet, and the file may still hold
        the record of an earlier holder that was killed: the record is read again briefly until it names a live
        process (on this host) or time runs out.
        """
        if fcntl is None or not self.path.is_file():
            return None
        if self._fd is None:
            fd = self._try_lock()
            if fd is not None:  # free: release at once
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                return None
        for _ in range(20):
            record = self._read_record()
            if record and (record.get("host") != socket.gethostname() or _pid_alive(int(record.get("pid", 0)))):
                return record
            time.sleep(0.05)
        return {}  # held, but by a process whose record is not (yet) there: say so rather than name a dead one

    def check_free(self) -> None:
        """Raise RootLocked naming the holder when another process holds the lock; takes nothing, creates nothing."""
        holder = self.holder()
        if holder is not None and self._fd is None:
            raise self._refusal(holder, 0.0)

    def _refusal(self, holder: dict[str, Any] | None, wait_s: float) -> RootLocked:
        waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
        hint = "" if wait_s > 0 else "; to wait for it instead, pass --set execution.lock_wait_s=SECONDS (e.g. 3600)"
        return RootLocked(
            f"run root {self.root} is in use by another run{waited}: {describe_holder(holder)}. "
            f"Only one run may write a run root at a time; wait for it to finish{hint}",
            holder,
        )

    def _read_record(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
            record = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def acquire(
        self, wait_s: float = 0.0, flow_run: str | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.2,
    ) -> None:
        """Take the lock, waiting up to `wait_s` seconds for the holder to finish; raise RootLocked naming it.

        `on_wait` is called once, with the holder's record, when the lock is busy and the call is going to wait.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this lock object")
        if fcntl is None:
            warnings.warn(
                f"this platform has no fcntl: {self.root} is not locked, so nothing stops two runs on it at once",
                RuntimeWarning, stacklevel=2,
            )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + max(0.0, wait_s)
        warned = False
        while (fd := self._try_lock()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._refusal(self.holder(), wait_s)
            if not warned and on_wait is not None:
                on_wait(self.holder() or {})
            warned = True
            time.sleep(min(poll_s, remaining))
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": self.purpose, "flow_run": flow_run, "root": str(self.root),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the record and drop the lock (the file stays: see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def held(
        self, wait_s: float = 0.0, flow_run: str | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
    ) -> Iterator[RootLock]:
        """Hold the lock for the block."""
        self.acquire(wait_s, flow_run=flow_run, on_wait=on_wait)
        try:
            yield self
        finally:
            self.release()
