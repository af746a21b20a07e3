"""The index a server answers from: loaded once, swapped for a new version when one is published.

``faiss_index`` is published as a new version directory behind a symlink swapped in one rename
(:func:`core.storage.publish_dir`). A watcher thread polls the link; when it points elsewhere the
new version is loaded beside the old one (the encoder is kept when the index records the same
one) and replaces it in a single assignment. A request takes the current :class:`Loaded` once
and finishes on it, so requests in flight never see half of a swap.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from imgsim_assets.core.search import FaissSearcher
from imgsim_assets.core.storage import artifact_path

log = logging.getLogger("imgsim.serve")


@dataclass(frozen=True)
class Loaded:
    """One version of the index, ready to answer."""

    searcher: FaissSearcher
    version: str
    loaded_at: float = field(default_factory=time.time)


def index_version(link: Path) -> str:
    """Which version the published index is: its version directory's name (or mtime)."""
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return str(link.stat().st_mtime_ns)


class LiveIndex:
    """The current version of ``faiss_index`` under ``assets_dir``, kept current by a thread."""

    def __init__(self, assets_dir: Path, device: str = "auto", reload_interval_s: float = 1.0,
                 allow_other_weights: bool = False, backend: str = "torch", dtype: str = "auto") -> None:
        self.assets_dir = Path(assets_dir)
        self.allow_other_weights = allow_other_weights
        self.link = artifact_path(self.assets_dir, "faiss_index")
        self.device, self.backend, self.dtype = device, backend, dtype
        self.reload_interval_s = reload_interval_s
        self.current = self._load(None)
        self.reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._derived_cache: dict[Path, tuple[int, object]] = {}  # artifact → (mtime, derived)

    def _load(self, previous: Loaded | None) -> Loaded:
        version = index_version(self.link)
        searcher = FaissSearcher.open(self.assets_dir, device=self.device, allow_other_weights=self.allow_other_weights,
                                      backend=self.backend, dtype=self.dtype)
        searcher.warm(previous.searcher if previous is not None else None)  # not on the first query
        return Loaded(searcher, version)

    def poll(self) -> bool:
        """Load a newly published version, if there is one; True when it swapped."""
        if not self.link.exists() or index_version(self.link) == self.current.version:
            return False
        loaded = self._load(self.current)
        self.current = loaded  # one assignment: requests already running keep the old one
        self.reloads += 1
        log.warning("index reloaded: version %s, %d vectors", loaded.version, loaded.searcher.num_vectors)
        return True

    def start(self) -> None:
        if self.reload_interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="imgsim-index-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_interval_s):
            try:
                self.poll()
            except Exception:  # a half-written or broken version: keep serving the old one
                log.exception("could not load the new index version; still serving %s", self.current.version)

    def table(self, asset: str, derive: Callable[[pa.Table | None], object]):
        """``derive`` of an analysis table (``near_duplicates``, ``image_clusters``; None when never
        materialized), computed once per version of the file, not per request."""
        return self._derived(asset, ".parquet", pq.read_table, derive)

    def document(self, asset: str, derive: Callable[[dict | None], object]):
        """``derive`` of a JSON artifact (``retrieval_eval``; None when never materialized), computed
        once per version of the file, as :meth:`table`."""
        return self._derived(asset, ".json", lambda path: json.loads(path.read_bytes()), derive)

    def _derived(self, asset: str, suffix: str, read: Callable[[Path], object], derive: Callable[[object], object]):
        """``derive(read(file))`` of ``asset``'s artifact, cached by the file's mtime (the IO
        managers replace a file in one rename, so a new version is a new mtime)."""
        path = artifact_path(self.assets_dir, asset, suffix=suffix)
        cached = self._derived_cache.get(path)
        try:
            mtime = path.stat().st_mtime_ns
            fresh = cached is None or cached[0] != mtime
            data = read(path) if fresh else None
        except FileNotFoundError:  # never materialized, or removed since
            return derive(None)
        if fresh:
            cached = (mtime, derive(data))
            self._derived_cache[path] = cached
        return cached[1]
