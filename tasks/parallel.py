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
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

PER_WORKER = 2  # pending items per worker by default: one running, one queued behind it


class _Packed:
    """An Arrow array, table or record batch as IPC-stream bytes: a self-contained copy for another process.

    Arrow objects pickle zero-copy, as views of the sender's buffers; a transport that reuses or frees its
    receive buffers while such a view is alive (a Dask comm under load) can hand a worker different bytes
    than were sent. Bytes of an IPC stream own their memory on both sides.
    """

    def __init__(self, value: Any) -> None:
        import pyarrow as pa

        self.kind = type(value).__name__
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        if isinstance(value, pa.Array):
            value = pa.record_batch([value], names=["v"])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write(value)
        self.data = sink.getvalue().to_pybytes()

    def unpack(self) -> Any:
        import pyarrow as pa

        table = pa.ipc.open_stream(pa.py_buffer(self.data)).read_all()
        if self.kind in ("Table",):
            return table
        batch = table.combine_chunks().to_batches()
        if self.kind == "RecordBatch":
            return batch[0] if batch else pa.RecordBatch.from_pylist([], schema=table.schema)
        column = table.column(0).combine_chunks()
        return column if self.kind != "ChunkedArray" else pa.chunked_array([column])


def _is_arrow(value: Any) -> bool:
    import pyarrow as pa

    return isinstance(value, (pa.Array, pa.ChunkedArray, pa.Table, pa.RecordBatch))


def pack(value: Any) -> Any:
    """`value` with its Arrow objects (at the top, or one level down in a tuple, list or dict) packed."""
    if _is_arrow(value):
        return _Packed(value)
    if isinstance(value, tuple):
        return tuple(_Packed(v) if _is_arrow(v) else pack_shallow(v) for v in value)
    return pack_shallow(value)


def pack_shallow(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _Packed(v) if _is_arrow(v) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_Packed(v) if _is_arrow(v) else v for v in value]
    return value


def unpack(value: Any) -> Any:
    """The inverse of `pack`."""
    if isinstance(value, _Packed):
        return value.unpack()
    if isinstance(value, tuple):
        return tuple(unpack(v) for v in value)
    if isinstance(value, dict):
        return {k: v.unpack() if isinstance(v, _Packed) else v for k, v in value.items()}
    if isinstance(value, list):
        return [v.unpack() if isinstance(v, _Packed) else v for v in value]
    return value


def _same(value: Any) -> Any:
    return value


class _InWorker:
    """`fn` as run in a worker: unpack the arguments, call it, pack its result for the way back.

    It carries `fn`'s name, so a Dask dashboard (and its task keys) still shows what runs.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *packed: Any) -> Any:
        return pack(self.fn(*unpack(packed)))


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
    if isinstance(executor, ThreadPoolExecutor):  # threads share this process's memory: nothing to copy
        task, wrap, result = fn, tuple, _same
    else:
        task, wrap, result = _InWorker(fn), pack, unpack
    try:
        for item in items:
            pending.append(executor.submit(task, *wrap(tuple(item))))
            if len(pending) >= limit:
                yield result(pending.popleft().result())
        while pending:
            yield result(pending.popleft().result())
    finally:
        for fut in pending:
            fut.cancel()
