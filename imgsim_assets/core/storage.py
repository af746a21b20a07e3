"""Atomic file and directory publication.

Every artifact is written under a temporary name in its final directory and then renamed
into place, so a reader (or a run killed half-way) sees the old version or the new one,
never a mix. Multi-file artifacts are published as a versioned directory behind a
symlink that is swapped atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class DataLayout:
    """What lives where under the data root."""

    root: Path

    @property
    def images(self) -> Path:
        """The inputs: one folder per batch."""
        return self.root / "images"

    @property
    def assets(self) -> Path:
        """The artifacts (:func:`artifact_path`)."""
        return self.root / "assets"

    @property
    def dagster_home(self) -> Path:
        """The Dagster instance: run and event storage, ``dagster.yaml``."""
        return self.root / "dagster_home"

    @property
    def milvus_lite(self) -> Path:
        """The Milvus Lite file used when no Milvus server is configured."""
        return self.root / "milvus.db"


def artifact_path(root: str | os.PathLike, asset: str | tuple[str, ...], partition: str | None = None,
                  suffix: str = "") -> Path:
    """Where an asset's artifact lives: ``<root>/<asset>/<partition><suffix>``, or
    ``<root>/<asset><suffix>`` when unpartitioned (the IO managers write there, readers
    outside Dagster look there)."""
    base = Path(root).joinpath(*((asset,) if isinstance(asset, str) else asset))
    return base / f"{partition}{suffix}" if partition is not None else base.with_suffix(suffix)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if tmp.is_file():
            move_into_place(tmp, path)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def move_into_place(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Durably rename a complete file ``src`` (same filesystem) over ``dst``."""
    src, dst = Path(src), Path(dst)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def publish_dir(link: str | os.PathLike, populate) -> Path:
    """Publish a multi-file artifact at ``link``.

    ``populate(directory)`` fills a fresh versioned directory; then the symlink ``link`` is
    switched to it in one rename and the previous version is removed. Readers that already
    opened files of the old version keep reading them (POSIX semantics).
    """
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    version = link.with_name(f"{link.name}.v-{uuid.uuid4().hex[:12]}")
    version.mkdir()
    try:
        populate(version)
        _fsync_dir(version)
        previous = link.resolve() if link.is_symlink() else None
        if link.exists() and not link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a published artifact (expected a symlink)")
        tmp_link = temp_sibling(link)
        os.symlink(version.name, tmp_link)
        os.replace(tmp_link, link)
        _fsync_dir(link.parent)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return version


def remove_stale_temporaries(directory: str | os.PathLike, min_age_s: float = 3600.0) -> int:
    """Remove leftovers of killed writers in ``directory``: temp files and unpublished versions.

    Only entries older than ``min_age_s`` go, so a writer that is still running keeps its files.
    """
    import time

    directory = Path(directory)
    if not directory.is_dir():
        return 0
    live = {p.resolve() for p in directory.iterdir() if p.is_symlink()}
    cutoff = time.time() - min_age_s
    removed = 0
    for p in directory.iterdir():
        stale_tmp = p.name.startswith(".") and ".tmp-" in p.name
        orphan_version = ".v-" in p.name and p.is_dir() and not p.is_symlink() and p.resolve() not in live
        if (stale_tmp or orphan_version) and p.lstat().st_mtime < cutoff:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


def ensure_open_files(count: int, spare: int = 256) -> None:
    """Make room for ``count`` more open files in this process: a consumer of every batch keeps
    one open Parquet file per batch (streamed, not loaded), and a year of daily folders is more
    than the usual soft limit of 1,024. The soft limit is raised up to the hard one; beyond
    that, a clear error instead of "Too many open files" halfway through."""
    import resource

    try:
        now = len(os.listdir("/proc/self/fd"))
    except OSError:
        now = 64
    wanted = now + count + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise OSError(f"reading {count} batch files at once needs about {wanted} open files, but this process may "
                      f"open at most {hard} (hard limit): raise it, e.g. `ulimit -n {wanted}` as root or in the "
                      "service's LimitNOFILE")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
