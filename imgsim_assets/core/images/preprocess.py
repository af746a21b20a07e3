"""One file → one manifest record and its pixels: read, hash, decode. Whatever reading or
decoding raises as :class:`Rejected` becomes the file's rejected record here."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from imgsim_assets.core.images.decoding import decode_pixels
from imgsim_assets.core.images.names import image_id_from_sha256, record_path
from imgsim_assets.core.images.protocol import Box, Preprocess
from imgsim_assets.core.images.reading import read_file_stat
from imgsim_assets.core.images.reasons import Rejected
from imgsim_assets.core.images.records import ImageRecord


def preprocess_file(path: str | os.PathLike, root: str | os.PathLike, pre: Preprocess,
                    box: Box | None = None) -> tuple[ImageRecord, np.ndarray | None]:
    """Read, hash and preprocess one file (only ``box`` of it when given): an ``ok`` record with
    its pixels, or a ``rejected`` one with None. Never raises for a bad file (only
    :class:`BadBox` for a box that leaves too little of it)."""
    path = Path(os.fsdecode(path))
    record = ImageRecord(path=record_path(path, root))
    try:
        data, st = read_file_stat(path, root, max_bytes=pre.max_file_bytes)
        record.modified_at = utc_from_ns(st.st_mtime_ns)
        digest = hashlib.sha256(data).hexdigest()
        record.sha256, record.image_id, record.bytes = digest, image_id_from_sha256(digest), len(data)
        return record, decode_pixels(data, pre, record, box)
    except Rejected as e:
        if e.mtime_ns is not None:
            record.modified_at = utc_from_ns(e.mtime_ns)
        return record.reject(e), None


def utc_from_ns(ns: int) -> datetime:
    """A file time in nanoseconds since the epoch as an exact UTC datetime (to the microsecond;
    going through a float second count would round some)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
