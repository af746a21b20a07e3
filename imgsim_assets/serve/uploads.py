"""Uploads decoded in a pool of their own, within a budget.

An upload's decode is the most expensive thing a client can ask for, so it runs on its own
few threads, never on the pool that id queries, thumbnails and pages use: a burst of heavy
uploads waits for those threads while everything else is answered at once. At most
``max_pending`` uploads decode or wait; more are refused (503) with a ``Retry-After`` from the
measured decode time. Each decode is held to a budget of decoded bytes read from the image's
header (:func:`images.decoding.decode_bytes`), and memory is handed back when a burst of large
ones is over.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

from imgsim_assets.core.images.decoding import decode_bytes
from imgsim_assets.serve import memory
from imgsim_assets.serve.batching import Overloaded

TRIM_AFTER = 32 << 20  # an upload this large (as RGB) asks for memory to be handed back after its burst


class UploadDecoder:
    """``searcher.decode_upload`` on ``workers`` threads, at most ``max_pending`` at a time."""

    def __init__(self, workers: int, max_pending: int, max_decode_bytes: int) -> None:
        self.workers, self.max_pending, self.max_decode_bytes = workers, max_pending, max_decode_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgsim-decode")
        self.pending = 0
        self._seconds = 0.05  # moving average of one decode's wall time
        self._large = False  # a large decode since the last trim
        memory.map_large_blocks()

    def retry_after(self) -> int:
        """Seconds until the uploads already admitted are decoded, as measured so far."""
        return max(1, math.ceil(self.pending * self._seconds / self.workers))

    async def decode(self, searcher, data: bytes, name: str, box=None):
        """(record, pixels or None) of one upload (only ``box`` of it when given);
        :class:`Overloaded` when too many are waiting, ``images.BadBox`` for a box that leaves
        too little of it."""
        if self.pending >= self.max_pending:
            raise Overloaded(f"{self.pending} uploads are being decoded", self.retry_after())
        self.pending += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._decode, searcher, data, name, box)
        finally:
            self.pending -= 1
            if not self.pending and self._large:  # the burst is over: hand its memory back
                self._large = False
                loop.run_in_executor(self._pool, memory.trim)

    def _decode(self, searcher, data: bytes, name: str, box):
        began = time.perf_counter()
        record, pixels = searcher.decode_upload(data, name, self.max_decode_bytes, box)
        self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - began)
        if pixels is not None and decode_bytes("RGB", record.width, record.height) >= TRIM_AFTER:
            self._large = True
        return record, pixels

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
