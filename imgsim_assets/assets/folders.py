"""``batch_folders``: the image batch folders as an observable source asset.

A folder's data version is the fingerprint of its files (names, sizes, mtimes). The sensor and
``imgsim ingest`` record it as an observation of the folder's partition; ``raw_images`` records
the fingerprint it read. A batch is changed when the two differ (:func:`folder_changed`, the one
definition of it), and the UI shows everything downstream of a changed folder as stale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AssetKey,
    AssetObservation,
    AssetRecordsFilter,
    BetaWarning,
    DagsterInstance,
    DataVersionsByPartition,
    observable_source_asset,
)

from imgsim_assets.core import images
from imgsim_assets.dagster_private import data_version_tags
from imgsim_assets.partitions import image_batches
from imgsim_assets.resources import StorageResource

# The data version of a folder that cannot be listed (vanished, unreadable, no files). It differs
# from every fingerprint, so the batch counts as changed and its run reports the problem.
UNREADABLE = "unreadable"

# Metadata of raw_images: the fingerprint of the files it read, i.e. the version of the folder
# the batch's manifest (and pixels: one multi-asset) was built from.
CONSUMED_KEY = "folder_fingerprint"
MANIFEST = AssetKey("raw_images")


def folder_version(folder: Path) -> str:
    """The data version of a batch folder: the fingerprint of its files, or ``UNREADABLE``.
    (Resolved, as raw_images reads it: the fingerprint covers the files' paths.)"""
    return images.fingerprint_folder(folder) or UNREADABLE


def folder_versions(folders: list[Path]) -> list[str]:
    """:func:`folder_version` of many folders, over several processes when there are many."""
    return [version or UNREADABLE for version in images.fingerprint_folders(folders)]


def folder_changed(observed: str | None, consumed: str | None) -> bool:
    """Whether a batch must be read again: its folder's observed version is not the one its
    manifest was built from (or either is unknown)."""
    return observed is None or observed != consumed


def _observe(context, storage: StorageResource) -> DataVersionsByPartition:
    """The current version of every batch folder."""
    batches = context.instance.get_dynamic_partitions(image_batches.name)
    return DataVersionsByPartition(dict(zip(batches, folder_versions([storage.batch_dir(b) for b in batches]))))


with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)  # said once per import of the code location otherwise
    batch_folders = observable_source_asset(
        name="batch_folders",
        partitions_def=image_batches,
        group_name="ingest",
        description="One folder of images per image_batches partition, under the images root. Its data "
        "version is the fingerprint of its files (names, sizes, mtimes); the new_image_batches sensor "
        "and `imgsim ingest` observe it.",
    )(_observe)


def observation(batch: str, version: str) -> AssetObservation:
    """The event recording that ``batch``'s folder is at ``version``."""
    return AssetObservation(batch_folders.key, partition=batch, tags=data_version_tags(version))


def _observed(record) -> str | None:
    return record.asset_observation.data_version


def _consumed(record) -> str | None:
    value = record.asset_materialization.metadata.get(CONSUMED_KEY)
    return value.value if value is not None else None


def consumed_version(instance: DagsterInstance, batch: str) -> str | None:
    """The folder version the latest ``raw_images`` of ``batch`` was built from."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=MANIFEST, asset_partitions=[batch]), limit=1
    ).records
    return _consumed(records[0]) if records else None


def _latest_per_partition(fetch, key: AssetKey, read) -> dict[str, str | None]:
    """``read`` of the newest record of every partition of ``key``, paging through the event log
    newest first: a few queries for all batches instead of one or two per batch."""
    found: dict[str, str | None] = {}
    cursor = None
    while True:
        result = fetch(AssetRecordsFilter(asset_key=key), limit=PAGE, cursor=cursor)
        for record in result.records:
            if record.partition_key is not None and record.partition_key not in found:
                found[record.partition_key] = read(record)
        if not result.has_more:
            return found
        cursor = result.cursor


PAGE = 1000


def observed_versions(instance: DagsterInstance) -> dict[str, str | None]:
    """The latest observed version of every batch folder."""
    return _latest_per_partition(instance.fetch_observations, batch_folders.key, _observed)


@dataclass(frozen=True)
class FolderVersions:
    """Every batch folder's observed version and the version its manifest was built from, read
    once for all batches: whether each must be read again."""

    observed: dict[str, str | None]
    consumed: dict[str, str | None]

    @classmethod
    def read(cls, instance: DagsterInstance) -> "FolderVersions":
        return cls(observed_versions(instance), _latest_per_partition(instance.fetch_materializations, MANIFEST, _consumed))

    def changed(self, batch: str) -> bool:
        return folder_changed(self.observed.get(batch), self.consumed.get(batch))
