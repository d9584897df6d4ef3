"""The per-file guard: a time limit on one file's parse, and its failures turned into quarantine rows.

`parse_guarded` runs one file's reader and always returns items: whatever a parser
raises (a bug, a `MemoryError`, a deep recursion, running past `file_timeout_s`)
becomes a `Problem` for that file, so one bad file never stops a batch.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from refinery.tasks.ingest.base import Item, Problem, ReadError


class FileTimeout(BaseException):
    """Raised inside a parse that ran past `file_timeout_s`.

    A BaseException, so that `except Exception` in a parser library can't swallow it.
    """


class _Watchdog:
    """One daemon thread per process that raises `FileTimeout` in threads past their deadline.

    It injects the exception with `PyThreadState_SetAsyncExc`, so it works in any thread
    (in-process, worker processes, Dask threads) and costs nothing per file beyond a
    dict entry. The exception lands between Python bytecodes: a single long call into C
    finishes first (subprocesses such as Tesseract get their own timeout). It fires
    again every `RETRY_S` in case a `__del__` or weakref callback swallowed it.
    """

    RETRY_S = 0.2

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: dict[int, list[Any]] = {}  # token -> [deadline, thread id, fired]
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def register(self, seconds: float) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():  # first use, or after a fork
                self._thread = threading.Thread(target=self._run, name="ingest-file-timeout", daemon=True)
                self._thread.start()
            token = next(self._tokens)
            deadline = time.monotonic() + seconds
            self._active[token] = [deadline, threading.get_ident(), False]
            if deadline < self._wake_at:
                self._cond.notify()
            return token

    def unregister(self, token: int) -> bool:
        """Stop watching; True if the deadline passed (no exception fires after this returns)."""
        with self._cond:
            return self._active.pop(token)[2]

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for entry in self._active.values():
                    if entry[0] <= now:
                        entry[2] = True
                        entry[0] = now + self.RETRY_S
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry[1]), ctypes.py_object(FileTimeout))
                self._wake_at = min((e[0] for e in self._active.values()), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)


_WATCHDOG = _Watchdog()


class time_limit:  # noqa: N801 (used as a context manager, reads like one)
    """Raise `FileTimeout` in the current thread once `seconds` have passed (see `_Watchdog`).

    `__exit__` raises `FileTimeout` whenever the deadline passed, whatever happened inside.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._token = -1

    def __enter__(self) -> time_limit:
        self._token = _WATCHDOG.register(self.seconds)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if _WATCHDOG.unregister(self._token):
            # Clear an exception still pending so it can't surface later in unrelated code.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
            raise FileTimeout(f"parse ran past file_timeout_s={self.seconds}")
        return False


def parse_guarded(read: Callable[[], Iterable[Item]], timeout_s: float) -> list[Item]:
    """Every item `read()` yields within `timeout_s`, with any failure as a `Problem`; never raises for bad input.

    A file-level `ReadError` keeps the records read before it; a timeout keeps none,
    since how far a slow parse got depends on the machine and outputs must not. Nor
    does `decompression_limit`: a bomb (an archive's members included) is one
    quarantine row and no documents, so a half-read bomb never passes for data.
    """
    items: list[Item] = []
    try:
        with time_limit(timeout_s):
            for item in read():
                items.append(item)
    except FileTimeout:
        return [Problem("timeout", f"parsing took longer than file_timeout_s={timeout_s}; raise it or split the file")]
    except ReadError as exc:
        if exc.reason == "decompression_limit":
            return [Problem(exc.reason, exc.message)]
        items.append(Problem(exc.reason, exc.message))
    except MemoryError:
        items.append(Problem("too_large", "ran out of memory parsing this file; lower max_file_bytes"))
    except RecursionError:
        items.append(Problem("parse_error", "structure nested too deeply to parse"))
    except Exception as exc:  # noqa: BLE001 (a parser bug on one file must not stop the run)
        items.append(Problem("parse_error", f"{type(exc).__name__}: {exc}"))
    if not items:
        items.append(Problem("no_records", "file holds no records"))
    return items
