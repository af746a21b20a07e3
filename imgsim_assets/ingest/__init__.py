"""``imgsim ingest``: bring every automated asset up to date with the batch folders, headless.

It reads top to bottom as it runs (:func:`ingest`): **observe** the folders (new ones become
``image_batches`` partitions, gone ones are removed, each folder's version is recorded as an
observation of ``batch_folders``; here, with the folder names in :mod:`.batches`), **plan** from
the definitions' asset graph which job runs are due (:mod:`.plan`), **execute** them in process
with the code location's jobs (:mod:`.execute`), and **report**, including any blocking asset
check that failed on the current materialization of its asset (:class:`IngestReport`). One ingest
at a time per instance and host, which first recovers the runs a killed one left (:mod:`.lock`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, Definitions

from imgsim_assets.assets import folders
from imgsim_assets.ingest.batches import discover_batches, invalid_batch_name
from imgsim_assets.ingest.execute import execute, failed_checks, failed_checks_of, fill_report, run_job
from imgsim_assets.ingest.lock import INGEST_HOST_TAG, LOCK_FILE, IngestRunning, ingest_lock, recover_abandoned_runs
from imgsim_assets.ingest.plan import MILVUS, Step, plan
from imgsim_assets.partitions import image_batches

__all__ = [
    "INGEST_HOST_TAG",
    "LOCK_FILE",
    "MILVUS",
    "EncoderChanged",
    "Folders",
    "IngestReport",
    "IngestRunning",
    "Step",
    "discover_batches",
    "execute",
    "failed_checks",
    "failed_checks_of",
    "ingest",
    "ingest_lock",
    "invalid_batch_name",
    "observe_folders",
    "plan",
    "recover_abandoned_runs",
    "run_job",
]


@dataclass
class IngestReport:
    """What one ingest found and did, stage by stage, and what failed (run order, then checks)."""

    new_batches: list[str] = field(default_factory=list)
    removed_batches: list[str] = field(default_factory=list)
    invalid_folders: dict[str, str] = field(default_factory=dict)
    embedded: list[str] = field(default_factory=list)
    trained: bool = False
    shards: list[str] = field(default_factory=list)
    merged: bool = False
    evaluated: bool = False
    analyzed: bool = False
    milvus: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # run ids of an interrupted ingest, marked failed
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def ingest(
    defs: Definitions,
    instance: DagsterInstance,
    images_dir: Path,
    retrain: bool = False,
    log: Callable[[str], None] = print,
    milvus: bool = False,
) -> IngestReport:
    """Bring every automated asset up to date with the batch folders under ``images_dir``."""
    with ingest_lock(instance):
        report = IngestReport(recovered=recover_abandoned_runs(instance, log))
        reembed = encoder_changed(defs, instance, retrain)
        if reembed:
            log("the encoder's weights changed: every batch is embedded again and the index retrained")
        seen = observe_folders(instance, images_dir, log)
        report.new_batches, report.removed_batches, report.invalid_folders = seen.new, seen.removed, seen.invalid
        steps = plan(defs, instance, retrain=retrain, extra=[MILVUS] if milvus else [], removed=seen.removed,
                     refresh=[EMBEDDINGS] if reembed else [])
        outcomes = execute(defs, instance, steps, log)
        fill_report(report, steps, outcomes)
        report.failed.update(failed_checks(defs, instance))
        return report


EMBEDDINGS = AssetKey("image_embeddings")


class EncoderChanged(ValueError):
    """The configured weights are not the ones the trained models (and the index) were made with."""


def encoder_changed(defs: Definitions, instance: DagsterInstance, retrain: bool) -> bool:
    """Whether the configured encoder's weights differ from those ``pca_model`` was trained on,
    so that every batch must be embedded again. Without ``retrain`` that is refused: it
    replaces every vector of the collection."""
    from imgsim_assets.core import weights

    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey("pca_model")), limit=1).records
    entry = records[0].asset_materialization.metadata.get("weights_fingerprint") if records else None
    trained = entry.value if entry is not None else ""
    encoder = defs.resources.get("encoder")
    if not trained or encoder is None:
        return False
    configured = weights.fingerprint(weights.resolve(encoder.model, encoder.weights), encoder.model)
    if configured == trained:
        return False
    if not retrain:
        raise EncoderChanged(
            f"the configured weights ({encoder.model}, {encoder.weights}: {weights.short(configured)}) are not the "
            f"ones the index was trained with ({weights.short(trained)}). Vectors of the two cannot share an index: "
            "run `imgsim ingest --retrain` to embed every batch again and retrain, or set IMGSIM_WEIGHTS back.")
    return True


@dataclass
class Folders:
    """The batch folders found, and how the partitions were changed to match them."""

    batches: list[str]
    new: list[str]
    removed: list[str]
    invalid: dict[str, str]


def observe_folders(instance: DagsterInstance, images_dir: Path, log: Callable[[str], None] = print) -> Folders:
    """Make the partitions match the batch folders and record each folder's current version."""
    batches, invalid = discover_batches(images_dir)
    for name, problem in invalid.items():
        log(f"skipping folder {name!r}: not a valid batch name ({problem})")
    known = set(instance.get_dynamic_partitions(image_batches.name))
    new = [b for b in batches if b not in known]
    removed = sorted(known - set(batches))
    if new:
        instance.add_dynamic_partitions(image_batches.name, new)
        log(f"registered {len(new)} new batch(es): {', '.join(new)}")
    for batch in removed:
        instance.delete_dynamic_partition(image_batches.name, batch)
        log(f"batch folder {batch!r} is gone: removed it from the partitions (and from the next index)")
    observed = folders.observed_versions(instance)
    for batch, version in zip(batches, folders.folder_versions([images_dir / b for b in batches])):
        if version != observed.get(batch):
            instance.report_runless_asset_event(folders.observation(batch, version))
    return Folders(batches, new, removed, invalid)
