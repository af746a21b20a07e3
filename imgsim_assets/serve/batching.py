"""Concurrent image queries gathered into one model call.

Each request decodes its own upload in a worker thread (Pillow releases the GIL, so uploads
decode in parallel); the pixels then wait in a bounded queue. One task takes whatever is
queued and, while other uploads are still being decoded, waits a short window for them; then
it runs the model once for all of them, off the event loop. A lone query waits for nobody;
under load the model sees batches instead of single images. A full queue answers
:class:`Overloaded` at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


class Overloaded(Exception):
    """Too many queries wait already: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Query:
    pixels: np.ndarray
    searcher: object  # the index version the request started on
    future: asyncio.Future


class ModelBatcher:
    """Runs ``searcher.embed_pixels`` for queued queries in batches of at most ``max_batch``."""

    def __init__(self, window_s: float = 0.002, max_batch: int = 16, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.window_s, self.max_batch, self.max_queue = window_s, max_batch, max_queue
        self.on_batch = on_batch
        self.decoding = 0  # uploads being decoded now: the only queries worth waiting for
        # The model always runs on the same thread: torch keeps its intra-op thread team per
        # calling thread, and a fresh pool thread would start (and spin up) another one.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgsim-model")
        self._queue: asyncio.Queue[_Query] | None = None
        self._task: asyncio.Task | None = None
        self.in_model = 0
        self.other = 0  # calls of run() waiting or running
        self._seconds_per_query = 0.05  # moving average, measured on the batches run

    @property
    def depth(self) -> int:
        """Queries waiting for the model."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def retry_after(self) -> int:
        """Seconds until the queries waiting now are answered, at the measured rate."""
        return max(1, math.ceil((self.depth + self.in_model) * self._seconds_per_query))

    async def embed(self, searcher, pixels: np.ndarray) -> np.ndarray:
        """The raw embedding of one preprocessed image, computed in a batch with its neighbours in time."""
        if self.depth >= self.max_queue:
            raise Overloaded(f"{self.depth} image queries are waiting", self.retry_after())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Query(pixels, searcher, future))
        return await future

    async def run(self, fn, *args):
        """``fn(*args)`` on the model's thread, between batches: other model work (a comparison)
        shares the thread team the batches use, and waits in the same bounded line."""
        if self.depth + self.other >= self.max_queue:
            raise Overloaded(f"{self.depth + self.other} model calls are waiting", self.retry_after())
        self.other += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)
        finally:
            self.other -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or not self.decoding:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            await self._answer(batch)

    async def _answer(self, batch: list[_Query]) -> None:
        # A batch spanning an index swap is answered per version (the encoder may differ).
        by_searcher: dict[int, list[_Query]] = {}
        for query in batch:
            by_searcher.setdefault(id(query.searcher), []).append(query)
        for queries in by_searcher.values():
            self.in_model = len(queries)
            began = time.perf_counter()
            try:
                vectors = await asyncio.get_running_loop().run_in_executor(
                    self._model_thread, queries[0].searcher.embed_pixels, [q.pixels for q in queries])
                per_query = (time.perf_counter() - began) / len(queries)
                self._seconds_per_query = 0.8 * self._seconds_per_query + 0.2 * per_query
            except Exception as e:  # the model failed: every query of the batch gets the error
                for q in queries:
                    if not q.future.done():
                        q.future.set_exception(e)
                continue
            finally:
                self.in_model = 0
            if self.on_batch:
                self.on_batch(len(queries))
            for q, v in zip(queries, vectors):
                if not q.future.done():  # the client may have gone
                    q.future.set_result(v[None, :])
