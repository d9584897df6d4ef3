"""`map_in_order` through a thread pool hands the objects themselves; other executors get packed copies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from refinery.tasks.parallel import map_in_order


def _identity_and_length(arr: pa.Array) -> tuple[int, int]:
    return id(arr), len(arr)


def test_threads_get_the_same_arrow_objects_in_order() -> None:
    arrays = [pa.array(range(n)) for n in range(1, 30)]
    with ThreadPoolExecutor(3) as pool:
        got = list(map_in_order(_identity_and_length, [(a,) for a in arrays], pool, in_flight=4))
    assert got == [(id(a), len(a)) for a in arrays]  # no IPC copy: the very arrays, results in input order
