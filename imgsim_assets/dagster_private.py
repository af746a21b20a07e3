"""The calls into Dagster that are not its public API, all of them, each pinned by a test
(``test_dagster_private.py``) that fails when a Dagster upgrade changes it.

Everything else in imgsim uses Dagster's public API only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dagster import AssetCheckEvaluation, AssetCheckKey, AssetKey, DagsterEventType, DagsterInstance, DagsterRun
from dagster._core.definitions.data_version import DATA_VERSION_TAG


def data_version_tags(version: str) -> dict[str, str]:
    """The tags that give a runless ``AssetObservation`` its data version (the version the UI
    shows and compares with what a materialization read)."""
    return {DATA_VERSION_TAG: version}


def latest_storage_ids(instance: DagsterInstance, key: AssetKey) -> dict[str, int]:
    """Storage id of the latest materialization of every partition of ``key``, in one query."""
    return dict(instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION))


@dataclass(frozen=True)
class CheckResult:
    """The latest evaluation of an asset check, and its event's storage id."""

    evaluation: AssetCheckEvaluation
    storage_id: int

    @property
    def target_storage_id(self) -> int | None:
        """Storage id of the materialization it checked (None when it checked none)."""
        target = self.evaluation.target_materialization_data
        return target.storage_id if target is not None else None


def latest_check_results(instance: DagsterInstance, keys: Iterable[AssetCheckKey]) -> dict[AssetCheckKey, CheckResult]:
    """The latest evaluation of each check that has one."""
    keys = list(keys)
    if not keys:
        return {}
    found = {}
    for key, record in instance.event_log_storage.get_latest_asset_check_execution_by_key(keys).items():
        evaluation = record.event.asset_check_evaluation if record is not None and record.event is not None else None
        if evaluation is not None:
            found[key] = CheckResult(evaluation, record.id)
    return found


def mark_run_failed(instance: DagsterInstance, run: DagsterRun, message: str) -> None:
    """Mark a run that no process runs any more failed, and free the pool slots it held."""
    instance.report_run_failed(run, message)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def postgres_url(instance: DagsterInstance) -> str | None:
    """The PostgreSQL URL of the instance's run storage, or None when it runs on something else."""
    return getattr(instance.run_storage, "postgres_url", None)
