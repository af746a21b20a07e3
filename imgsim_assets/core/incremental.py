"""Analyses that redo only what changed: a table remembers, in its Parquet metadata, what it
was computed with (threshold, index training, centroids…) and from which batches at which
versions; the next run keeps the rows of batches that are unchanged under the same state."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def file_version(path) -> str:
    """An artifact file's version: replaced atomically when rewritten, so size and mtime tell."""
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


STATE_KEY = "imgsim.incremental"  # Parquet metadata: what a table was computed with, and from which batches


def previous(path, state: dict) -> tuple[pa.Table, dict[str, str]] | None:
    """The table an analysis asset last wrote and the batches it covered (each with the version
    it had then), when it was computed with ``state`` (the same threshold, index training,
    centroids...): its rows still hold for those batches at those versions."""
    try:
        table = pq.read_table(path)
        before = json.loads((table.schema.metadata or {}).get(STATE_KEY.encode(), b"null"))
    except (FileNotFoundError, pa.ArrowInvalid, ValueError):
        return None
    if not before or any(before.get(k) != v for k, v in state.items()):
        return None
    return table, dict(before.get("batches", {}))


def with_state(table: pa.Table, state: dict, batches: dict[str, str]) -> pa.Table:
    return table.replace_schema_metadata({STATE_KEY: json.dumps({**state, "batches": dict(sorted(batches.items()))})})
