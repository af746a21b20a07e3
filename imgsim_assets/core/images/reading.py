"""Reading a file whole, safely: only regular files inside the images root, never blocking
on a FIFO or a device, and never half of a file that is still being written."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

from imgsim_assets.core.images.protocol import Preprocess
from imgsim_assets.core.images.reasons import (
    CHANGED_WHILE_READING, NOT_A_FILE, OUTSIDE_ROOT, TOO_LARGE, UNREADABLE, Rejected,
)  # fmt: skip

# A file whose size or mtime moves while it is read is read again, this many times in all.
READ_ATTEMPTS = 3
READ_RETRY_DELAY = 0.05  # seconds between reads of a changing file

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip
# Opening never blocks (a FIFO without a writer would) nor makes a terminal ours.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def read_file(path: str | os.PathLike, root: str | os.PathLike, *, max_bytes: int = Preprocess.max_file_bytes) -> bytes:
    """The bytes of ``path``, read whole and unchanged: :func:`read_file_stat` without the stat."""
    return read_file_stat(path, root, max_bytes=max_bytes)[0]


def read_file_stat(path: str | os.PathLike, root: str | os.PathLike, *,
                   max_bytes: int = Preprocess.max_file_bytes) -> tuple[bytes, os.stat_result]:
    """The bytes of ``path``, read whole and unchanged, and the stat of the open file they were
    read from (its size and mtime, as the bytes are); raises :class:`Rejected` saying why not.

    Only regular files inside ``root`` (symlinks resolved) of at most ``max_bytes`` are read.
    A file that changes while it is read (still being copied in) is read again, up to
    ``READ_ATTEMPTS`` times. A folder gets here when :func:`list_batch_files` could not list
    it or found it behind a symlink: its rejection says which.
    """
    path = Path(os.fsdecode(path))
    try:
        real, real_root = path.resolve(), Path(os.fsdecode(root)).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, before Python 3.13
        raise Rejected(UNREADABLE, f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}") from e
    if real != real_root and real_root not in real.parents:
        raise Rejected(OUTSIDE_ROOT, f"links to {real}, outside {real_root}")
    if real.is_dir():
        _reject_folder(path, real)
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(READ_RETRY_DELAY)
        try:
            data, changed, st = _read_once(real, max_bytes)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise Rejected(UNREADABLE, f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}") from e
        if not changed:
            return data, st
    raise Rejected(CHANGED_WHILE_READING, f"{changed} ({READ_ATTEMPTS} reads)", st.st_mtime_ns)


def _reject_folder(path: Path, real: Path) -> None:
    try:
        with os.scandir(real):
            pass
    except OSError as e:
        raise Rejected(UNREADABLE, f"folder cannot be listed ({type(e).__name__}: {e.strerror or e}); "
                                   "the files in it are not part of the batch") from e
    if path.is_symlink():
        raise Rejected(NOT_A_FILE, f"a symlink to the folder {real}: folders behind links are not followed")
    raise Rejected(NOT_A_FILE, "a directory, not a regular file")


def _read_once(path: Path, max_bytes: int) -> tuple[bytes, str, os.stat_result]:
    """The bytes of the regular file ``path``, what changed while they were read ("" if
    nothing did), and its stat after reading."""
    _check_regular(os.stat(path))  # before opening: opening a device can have effects
    fd = os.open(path, _OPEN_FLAGS)
    try:
        before = os.fstat(fd)
        _check_regular(before)  # what was opened, should the path have been replaced since
        if before.st_size > max_bytes:
            raise Rejected(TOO_LARGE, f"{before.st_size} bytes exceeds the limit of {max_bytes}", before.st_mtime_ns)
        data = _read_fd(fd)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if before.st_size != after.st_size:
        return data, f"size changed from {before.st_size} to {after.st_size} bytes while reading", after
    if before.st_mtime_ns != after.st_mtime_ns:
        return data, "modified (mtime changed) while reading", after
    if len(data) != after.st_size:
        return data, f"read {len(data)} bytes of a {after.st_size}-byte file", after
    return data, "", after


def _check_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Rejected(NOT_A_FILE, f"{_KINDS.get(stat.S_IFMT(st.st_mode), 'not a file')}, not a regular file",
                       st.st_mtime_ns)


def _read_fd(fd: int) -> bytes:
    """Everything from ``fd`` to its end. (Tests replace it to change a file mid-read.)"""
    with io.FileIO(fd, "rb", closefd=False) as f:
        return f.readall()
