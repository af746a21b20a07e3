"""Many files: :func:`preprocess_file` in a process-wide pool of decode workers, results
streamed back in input order."""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import itertools
import multiprocessing
import os
import threading
from typing import Iterable, Iterator

import numpy as np

from imgsim_assets.core.images.preprocess import preprocess_file
from imgsim_assets.core.images.protocol import Preprocess
from imgsim_assets.core.images.records import ImageRecord

_pool_lock = threading.Lock()
_pool: tuple[int, concurrent.futures.ProcessPoolExecutor] | None = None


def preprocess_files(
    paths: Iterable[str | os.PathLike],
    root: str | os.PathLike,
    pre: Preprocess,
    workers: int = 0,
    chunk: int = 16,
    prefetch: int = 2,
) -> Iterator[tuple[ImageRecord, np.ndarray | None]]:
    """Preprocess files in order, decoding in ``workers`` processes (0: one per CPU, 1: inline).

    Results stream back in input order while the workers decode ahead. At most
    ``prefetch`` chunks per worker are in flight, so a slow consumer (a model on a CPU)
    holds a bounded number of decoded images however many files there are.
    """
    paths = [os.fsdecode(p) for p in paths]
    workers = workers or default_workers()
    if workers <= 1 or len(paths) <= chunk:
        for p in paths:
            yield preprocess_file(p, root, pre)
        return
    chunks = iter([(paths[i : i + chunk], os.fsdecode(root), pre) for i in range(0, len(paths), chunk)])
    pool = decode_pool(workers)
    in_flight = collections.deque(pool.submit(_preprocess_chunk, c) for c in itertools.islice(chunks, workers * prefetch))
    try:
        while in_flight:
            results = in_flight.popleft().result()
            for c in itertools.islice(chunks, 1):
                in_flight.append(pool.submit(_preprocess_chunk, c))
            yield from results
    finally:
        for future in in_flight:  # abandoned early: drop what has not started
            future.cancel()


def _preprocess_chunk(args: tuple[list[str], str, Preprocess]) -> list[tuple[ImageRecord, np.ndarray | None]]:
    paths, root, pre = args
    return [preprocess_file(p, root, pre) for p in paths]


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def decode_pool(workers: int = 0) -> concurrent.futures.ProcessPoolExecutor:
    """The process-wide pool of ``workers`` (0: one per CPU, at most 8) decode processes,
    started on first use and reused.

    Starting workers costs seconds (each imports the interpreter's main module), so one pool
    serves every batch a process decodes. spawn, not fork: the caller may be a threaded
    server process (Dagster's run worker).
    """
    global _pool
    workers = workers or default_workers()
    with _pool_lock:
        if _pool is not None and (_pool[0] != workers or _pool[1]._broken):
            _pool[1].shutdown(wait=False, cancel_futures=True)
            _pool = None
        if _pool is None:
            ctx = multiprocessing.get_context("spawn")
            _pool = (workers, concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
        return _pool[1]


def shutdown_decode_pool() -> None:
    """Stop the decode processes (they are started again on demand)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool[1].shutdown(wait=True, cancel_futures=True)
            _pool = None


# Stop the pool before the interpreter tears modules down (its threads need them).
atexit.register(shutdown_decode_pool)
