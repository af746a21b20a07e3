"""The files of a batch folder, and a cheap fingerprint that tells when they changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from imgsim_assets.core.images.names import DONE_MARKER


def list_batch_files(batch_dir: str | os.PathLike) -> list[Path]:
    """All files of a batch folder, recursively, in a stable order.

    Hidden entries (dot files) and the ``_SUCCESS`` completion marker are not images of the
    batch. A subfolder that cannot be listed, and a symlink to a folder (not followed), are
    listed themselves, so that each gets a rejected row saying why its files are missing.
    Raises a clear error for a missing, unreadable or empty folder.
    """
    return [Path(p) for p in list_batch_paths(batch_dir)]


def list_batch_paths(batch_dir: str | os.PathLike) -> list[str]:
    """:func:`list_batch_files` as strings: no path objects for a caller that only needs names
    (a fingerprint over a million files)."""
    batch_dir = os.fspath(batch_dir)
    if not os.path.isdir(batch_dir):
        raise FileNotFoundError(f"image batch folder {batch_dir} does not exist or is not a folder")
    files: list[str] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(batch_dir, onerror=errors.append, followlinks=False):
        subfolders = sorted(d for d in dirnames if not d.startswith("."))
        linked = {d for d in subfolders if os.path.islink(os.path.join(dirpath, d))}
        dirnames[:] = [d for d in subfolders if d not in linked]
        prefix = dirpath if dirpath.endswith(os.sep) else dirpath + os.sep  # os.path.join's result, without its cost per file
        files += [prefix + name for name in sorted([*filenames, *linked])
                  if not name.startswith(".") and name != DONE_MARKER]
    if errors and errors[0].filename == batch_dir:
        raise PermissionError(f"image batch folder {batch_dir} cannot be read: {errors[0].strerror}")
    files += sorted(str(Path(e.filename)) for e in errors if e.filename)  # subfolders that cannot be listed
    if not files:
        raise ValueError(f"image batch folder {batch_dir} contains no files")
    return files


def folder_fingerprint(files: Iterable[str | os.PathLike]) -> str:
    """Changes when a file is added, removed, resized or touched: cheap staleness for a batch.

    A link is fingerprinted by its target, a dangling one by the link itself; an entry that
    vanished counts as such (the batch is then stale, which it is).
    """
    h = hashlib.sha256()
    lines: list[str] = []  # hashed a few thousand at a time: the same bytes, far fewer calls
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            try:
                st = os.lstat(f)
            except OSError:
                lines.append(f"{f}\0gone\n")
                continue
        lines.append(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n")
        if len(lines) >= 4096:
            h.update("".join(lines).encode("utf-8", "surrogateescape"))
            lines.clear()
    h.update("".join(lines).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
