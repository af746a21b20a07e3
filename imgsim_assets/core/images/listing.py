"""The files of a batch folder, and a cheap fingerprint that tells when they changed."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

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


def fingerprint_folder(folder: str | os.PathLike) -> str | None:
    """The fingerprint of a batch folder's files, as read through its resolved path; None when
    the folder cannot be listed (vanished, unreadable, no files)."""
    try:
        return folder_fingerprint(list_batch_paths(Path(folder).resolve()))
    except (OSError, ValueError):
        return None


# Fingerprinting is bound by one stat() per file (a million files take about 4 s on one core),
# so many folders are shared out to helper processes, one per CPU. Each costs about 0.2 s to
# start (it imports this package's image modules only), so few folders stay in this process.
FOLDERS_PER_PROCESS = 50


def fingerprint_folders(folders: Sequence[str | os.PathLike], processes: int = 0) -> list[str | None]:
    """:func:`fingerprint_folder` of every folder, in order, over up to ``processes`` processes
    (0: one per available CPU, at most one per ``FOLDERS_PER_PROCESS`` folders).

    This process takes one share; each helper process (a Python that imports only this
    package's image modules) gets another on stdin and answers on stdout. A helper that fails
    is not trusted: its share is done here.
    """
    folders = [os.fspath(f) for f in folders]
    processes = min(processes or _available_cpus(), len(folders) // FOLDERS_PER_PROCESS)
    if processes <= 1 or not sys.executable:
        return [fingerprint_folder(f) for f in folders]
    shares = [folders[i::processes] for i in range(processes)]  # interleaved: like-sized shares
    with concurrent.futures.ThreadPoolExecutor(processes - 1) as feeders:
        helpers = [feeders.submit(_in_helper_process, share) for share in shares[1:]]
        results = [[fingerprint_folder(f) for f in shares[0]]]
        for share, helper in zip(shares[1:], helpers):
            results.append(helper.result() or [fingerprint_folder(f) for f in share])
    merged: list[str | None] = [None] * len(folders)
    for i, result in enumerate(results):
        merged[i::processes] = result
    return merged


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _in_helper_process(share: list[str]) -> list[str | None] | None:
    """``share``'s fingerprints from a helper process, or None if it did not deliver them."""
    package_root = str(Path(__file__).resolve().parents[3])  # where ``imgsim_assets`` is importable from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            _HELPER, input=json.dumps(share).encode(), env=env,
            capture_output=True, check=True, timeout=3600,
        )  # fmt: skip
        result = json.loads(done.stdout)
        if not isinstance(result, list):
            raise ValueError(f"a {type(result).__name__} instead of answers for {len(share)} folders")
        if len(result) != len(share):
            raise ValueError(f"{len(result)} answers for {len(share)} folders")
        return result
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        logging.getLogger(__name__).warning("fingerprinting %d folders in this process instead: %s", len(share), e)
        return None


def _helper_main() -> None:
    """A helper process of :func:`fingerprint_folders`: folder paths (JSON) in, fingerprints out."""
    json.dump([fingerprint_folder(f) for f in json.load(sys.stdin)], sys.stdout)


_HELPER = [sys.executable, "-c", f"from {__name__} import _helper_main; _helper_main()"]
