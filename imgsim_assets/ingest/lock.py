"""One ingest at a time per instance and host, and recovery of the runs a killed ingest left started.

An ingest that was killed leaves runs marked as started, and the ``gpu`` pool slot one of them held
would block every later run; the next ingest, holding the lock, knows those runs are dead, marks
them failed and frees their slots. Artifacts are published atomically and content addressed, so
redoing the interrupted work converges on what an uninterrupted run builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from imgsim_assets.dagster_private import mark_run_failed

# Runs started by `imgsim ingest` carry the host they ran on; the ingest is their retry
# policy (the next one redoes what failed), so Dagster's run retries stay off for them.
INGEST_HOST_TAG = "imgsim/ingest_host"
LOCK_FILE = "imgsim-ingest.lock"
_UNFINISHED = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
               DagsterRunStatus.CANCELING]  # fmt: skip


class IngestRunning(RuntimeError):
    """Another ``imgsim ingest`` holds the instance's lock."""


@contextlib.contextmanager
def ingest_lock(instance: DagsterInstance) -> Iterator[None]:
    """Hold the instance's ingest lock (an ``flock``, released by the kernel if we die)."""
    path = Path(instance.root_directory) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise IngestRunning(f"another imgsim ingest (pid {holder}) is running on this instance ({path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def recover_abandoned_runs(instance: DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark the unfinished runs of earlier ingests on this host failed and free their pool slots.

    Only sound while holding :func:`ingest_lock`: then no other ingest here is running them.
    """
    records = instance.get_run_records(RunsFilter(statuses=_UNFINISHED, tags={INGEST_HOST_TAG: socket.gethostname()}))
    runs = [record.dagster_run for record in records]
    for run in runs:
        mark_run_failed(instance, run, "abandoned: the imgsim ingest that ran it stopped before it finished")
        partition = run.tags.get("dagster/partition")
        log(f"run {run.run_id[:8]} ({run.job_name}{' for ' + partition if partition else ''}) was abandoned by an "
            "interrupted ingest: marked failed, its work will be redone")
    return [run.run_id for run in runs]
