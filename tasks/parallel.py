"""Mapping per-batch work in order, in process or through any `concurrent.futures.Executor`.

Stages hand their pure per-batch functions to `map_in_order`; with an executor
(a process pool, or a Dask client's `get_executor()`) the batches run there,
with a bounded number in flight so memory stays bounded, and results come back
in input order, so outputs are identical either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any


def map_in_order(
    fn: Callable[..., Any], items: Iterable[tuple[Any, ...]], executor: Executor | None, in_flight: int = 4
) -> Iterator[Any]:
    """`fn(*item)` for each item, in order; through `executor` with at most `in_flight` pending."""
    if executor is None:
        for item in items:
            yield fn(*item)
        return
    pending = []
    for item in items:
        pending.append(executor.submit(fn, *item))
        if len(pending) >= in_flight:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()
