"""Why a file is rejected: the stable reason strings, and the exception that carries one."""

from __future__ import annotations

from imgsim_assets.core.images.names import as_text

# Stable strings: they end up in Parquet and in dashboards. Each has a row in the README's table.
NOT_AN_IMAGE = "not_an_image"
EMPTY_FILE = "empty_file"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
UNSUPPORTED_MODE = "unsupported_mode"
UNREADABLE = "unreadable"
DECODE_ERROR = "decode_error"
OUTSIDE_ROOT = "outside_root"  # a symlink that leads out of the images root
NOT_A_FILE = "not_a_file"  # a FIFO, socket, device or directory: never read
TOO_LARGE = "too_large"  # more bytes than Preprocess.max_file_bytes: never read
CHANGED_WHILE_READING = "changed_while_reading"  # still being written after READ_ATTEMPTS reads
REASONS = (NOT_AN_IMAGE, EMPTY_FILE, TRUNCATED, DECOMPRESSION_BOMB, TOO_SMALL, UNSUPPORTED_MODE, UNREADABLE,
           DECODE_ERROR, OUTSIDE_ROOT, NOT_A_FILE, TOO_LARGE, CHANGED_WHILE_READING)  # fmt: skip


class Rejected(Exception):
    """A file cannot become pixels: ``reason`` (one of :data:`REASONS`) and the library's
    ``message``, made valid UTF-8 text (it may quote an undecodable file name). ``mtime_ns``:
    the file's modification time when it was seen before being refused, else None."""

    mtime_ns: int | None = None

    def __init__(self, reason: str, message: str, mtime_ns: int | None = None) -> None:
        self.reason, self.message = reason, as_text(message)
        if mtime_ns is not None:
            self.mtime_ns = mtime_ns
        super().__init__(reason, self.message)  # both, so that it survives pickling

    def __str__(self) -> str:
        return self.message
