"""The one parallel map of the stages: in order, bounded, in process or through any `concurrent.futures.Executor`.

Stages hand their pure per-batch functions to `map_in_order`; with an executor
(a process pool, a thread pool, or a Dask client's `get_executor()`) the batches run
there with at most `in_flight` submitted and not yet consumed, so memory stays
bounded however long the input is, and results come back in input order, so the
outputs are identical however it runs. Without an executor it is a plain loop.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

PER_WORKER = 2  # pending items per worker by default: one running, one queued behind it


def executor_workers(executor: Executor) -> int:
    """How many items `executor` runs at once: a pool's size, a Dask cluster's threads, else the CPUs."""
    workers = getattr(executor, "_max_workers", None)  # ProcessPoolExecutor, ThreadPoolExecutor
    if isinstance(workers, int) and workers > 0:
        return workers
    client = getattr(executor, "_client", None)  # distributed's ClientExecutor
    if client is not None:
        try:
            threads = sum(client.nthreads().values())
        except Exception:  # noqa: BLE001 (a scheduler that can't answer: fall back to the CPUs)
            threads = 0
        if threads > 0:
            return threads
    return max(1, os.cpu_count() or 1)


def map_in_order(
    fn: Callable[..., Any],
    items: Iterable[tuple[Any, ...]],
    executor: Executor | None,
    in_flight: int | None = None,
) -> Iterator[Any]:
    """`fn(*item)` for each item, in input order; through `executor` with at most `in_flight` pending.

    `in_flight` defaults to `PER_WORKER` times the executor's workers. Items are drawn
    lazily, only as results are consumed; when the consumer stops early (or raises),
    the pending items that have not started are cancelled.
    """
    if executor is None:
        for item in items:
            yield fn(*item)
        return
    limit = max(1, in_flight if in_flight is not None else PER_WORKER * executor_workers(executor))
    pending: deque[Future[Any]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, *item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
