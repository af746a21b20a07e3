"""The headless way to run the main chain: register new batch folders, then materialize
whatever is missing or stale, stage by stage, down to ``faiss_index``.

Staleness follows Dagster's own rule, read from the instance's event log: an asset
partition is stale when it was never materialized or an upstream one was materialized
after it. A batch folder whose files changed since its manifest is stale too.

One ingest at a time per instance and host (a lock file in ``DAGSTER_HOME``). An ingest
that was killed leaves runs marked as started, and the ``gpu`` pool slot one of them held
would block every later run; the next ingest, holding the lock, knows those runs are dead,
marks them failed and frees their slots. Artifacts are published atomically and content
addressed, so redoing the interrupted work converges on what an uninterrupted run builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRunStatus, Definitions, RunsFilter

from imgsim_assets.core import images
from imgsim_assets.jobs import (
    analyze_index_job,
    embed_batch_job,
    index_shard_job,
    merge_index_job,
    milvus_sync_job,
    train_index_job,
)
from imgsim_assets.partitions import image_batches

# Step-level DEBUG events stay in the run's event log (and the UI); the terminal gets INFO.
_QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

# Runs started by `imgsim ingest` carry the host they ran on; the ingest is their retry
# policy (the next one redoes what failed), so Dagster's run retries stay off for them.
INGEST_HOST_TAG = "imgsim/ingest_host"
LOCK_FILE = "imgsim-ingest.lock"
_UNFINISHED = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
               DagsterRunStatus.CANCELING]  # fmt: skip

# Characters Dagster does not allow in partition keys, plus path separators.
_INVALID_KEY = re.compile(r"[\[\],*/\\]|^\.|\.\.")


def invalid_batch_name(name: str) -> str | None:
    """Why ``name`` cannot be a batch (partition key), or None when it can."""
    if not name.strip():
        return "empty name"
    if images.as_text(name) != name:
        return "not valid UTF-8 (partition keys are text; rename the folder)"
    if _INVALID_KEY.search(name):
        return "contains one of [ ] , * / \\ or starts with '.'"
    if len(name) > 255:
        return "longer than 255 characters"
    return None


def discover_batches(images_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Batch folder names under ``images_dir`` and the folders that cannot be batches (with why)."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist; put one folder per batch in it")
    batches, invalid = [], {}
    for entry in sorted(images_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        problem = invalid_batch_name(entry.name)
        if problem:
            invalid[images.as_text(entry.name)] = problem
        else:
            batches.append(entry.name)
    return batches, invalid


@dataclass
class IngestReport:
    new_batches: list[str] = field(default_factory=list)
    removed_batches: list[str] = field(default_factory=list)
    invalid_folders: dict[str, str] = field(default_factory=dict)
    embedded: list[str] = field(default_factory=list)
    trained: bool = False
    shards: list[str] = field(default_factory=list)
    merged: bool = False
    analyzed: bool = False
    milvus: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # run ids of an interrupted ingest, marked failed
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class _Ledger:
    """Latest materialization storage ids (and metadata) from the instance's event log."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance

    def latest(self, asset: str, partition: str | None = None):
        records = self.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1
        ).records
        return records[0] if records else None

    def storage_id(self, asset: str, partition: str | None = None) -> int:
        record = self.latest(asset, partition)
        return record.storage_id if record else 0

    def stale(self, asset: str, partition: str | None, upstream: list[tuple[str, str | None]]) -> bool:
        own = self.storage_id(asset, partition)
        return own == 0 or any(self.storage_id(a, p) > own for a, p in upstream)


def _batch_changed(ledger: _Ledger, images_dir: Path, batch: str) -> bool:
    record = ledger.latest("raw_images", batch)
    if record is None:
        return True
    recorded = record.asset_materialization.metadata.get("folder_fingerprint")
    try:
        current = images.folder_fingerprint(images.list_batch_files(images_dir / batch))
    except (OSError, ValueError):
        return True  # let the run report the problem with the folder
    return recorded is None or recorded.value != current


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
    runs = instance.get_runs(RunsFilter(statuses=_UNFINISHED, tags={INGEST_HOST_TAG: socket.gethostname()}))
    for run in runs:
        instance.report_run_failed(run, "abandoned: the imgsim ingest that ran it stopped before it finished")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        partition = run.tags.get("dagster/partition")
        log(f"run {run.run_id[:8]} ({run.job_name}{' for ' + partition if partition else ''}) was abandoned by an "
            "interrupted ingest: marked failed, its work will be redone")
    return [run.run_id for run in runs]


def ingest(
    defs: Definitions,
    instance: DagsterInstance,
    images_dir: Path,
    retrain: bool = False,
    log: Callable[[str], None] = print,
    milvus: bool = False,
) -> IngestReport:
    """Bring ``faiss_index`` up to date with the batch folders under ``images_dir``."""
    with ingest_lock(instance):
        report = IngestReport()
        report.recovered = recover_abandoned_runs(instance, log)
        _ingest(defs, instance, images_dir, retrain, log, milvus, report)
        return report


def _ingest(defs, instance, images_dir, retrain, log, milvus, report: IngestReport) -> None:
    batches, report.invalid_folders = discover_batches(images_dir)
    for name, problem in report.invalid_folders.items():
        log(f"skipping folder {name!r}: not a valid batch name ({problem})")
    known = set(instance.get_dynamic_partitions(image_batches.name))
    report.new_batches = [b for b in batches if b not in known]
    report.removed_batches = sorted(known - set(batches))
    if report.new_batches:
        instance.add_dynamic_partitions(image_batches.name, report.new_batches)
        log(f"registered {len(report.new_batches)} new batch(es): {', '.join(report.new_batches)}")
    for batch in report.removed_batches:
        instance.delete_dynamic_partition(image_batches.name, batch)
        log(f"batch folder {batch!r} is gone: removed it from the partitions (and from the next index)")

    ledger = _Ledger(instance)

    def run(job_name: str, label: str, partition: str | None = None) -> bool:
        log(f"running {job_name}" + (f" for {partition}" if partition else ""))
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance, partition_key=partition, raise_on_error=False, run_config=_QUIET, tags=_run_tags()
        )
        if not result.success:
            report.failed[label] = _failure_message(result)
            log(f"FAILED {label}: {report.failed[label]}")
        return result.success

    embedded_ok = []
    for batch in batches:
        if _batch_changed(ledger, images_dir, batch) or ledger.stale(
            "image_embeddings", batch, [("cropped_tensors", batch)]
        ):
            if run(embed_batch_job.name, f"embed {batch}", batch):
                report.embedded.append(batch)
        if ledger.storage_id("image_embeddings", batch):
            embedded_ok.append(batch)
    if not embedded_ok:
        log("no batch has embeddings; nothing to index")
        return
    if milvus:
        for batch in embedded_ok:
            if ledger.stale("milvus_collection", batch, [("image_embeddings", batch)]):
                if run(milvus_sync_job.name, f"milvus {batch}", batch):
                    report.milvus.append(batch)

    # Train when asked, when never trained, or when a training was cut short (a PCA newer
    # than the centroids or template trained on it).
    if (retrain or ledger.stale("cluster_centroids", None, [("pca_model", None)])
            or ledger.stale("index_template", None, [("pca_model", None), ("cluster_centroids", None)])):
        if not run(train_index_job.name, "train index"):
            return
        report.trained = True

    trained = [("pca_model", None), ("index_template", None)]
    for batch in embedded_ok:
        if ledger.stale("faiss_index_shards", batch, [("image_embeddings", batch), *trained]):
            if run(index_shard_job.name, f"shard {batch}", batch):
                report.shards.append(batch)

    shard_parts = [("faiss_index_shards", b) for b in embedded_ok]
    if report.shards or report.removed_batches or ledger.stale("faiss_index", None, [*trained, *shard_parts]):
        report.merged = run(merge_index_job.name, "merge index")
    if ledger.storage_id("faiss_index") and (
        report.merged or ledger.stale("near_duplicates", None, [("faiss_index", None)])
        or ledger.stale("image_clusters", None, [("cluster_centroids", None)])
    ):
        report.analyzed = run(analyze_index_job.name, "analyze index")


def _run_tags() -> dict[str, str]:
    return {INGEST_HOST_TAG: socket.gethostname(), "dagster/max_retries": "0"}


def _failure_message(result) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:  # the user code's exception, not Dagster's wrapper
                error = error.cause
            return error.message.strip().splitlines()[-1] if error.message else "step failed"
    return "run failed"
