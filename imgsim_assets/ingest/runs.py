"""Running an ingest's steps: in-process runs of the stages' jobs, one run per range of adjacent
batches, and the blocking checks that stop what reads a failed asset."""

from __future__ import annotations

import socket
from typing import Callable, Iterable

from dagster import AssetCheckKey, AssetKey, AssetRecordsFilter, AssetsDefinition, DagsterInstance, Definitions

from imgsim_assets.dagster_private import latest_check_results
from imgsim_assets.ingest.lock import INGEST_HOST_TAG
from imgsim_assets.ingest.stages import Step

# The run tags of a run over a range of partitions (as Dagster's backfills set them).
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"

# Step-level DEBUG events stay in the run's event log (and the UI); the terminal gets INFO.
_QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_steps(defs: Definitions, instance: DagsterInstance, steps: list[Step],
              log: Callable[[str], None] = print) -> dict[str, str | None]:
    """Run one stage's steps, adjacent batches together (up to the stage's ``batches_per_run``).
    Returns, per step label, None when it succeeded or the first line of why it failed. A range
    that fails is run again batch by batch, so that one bad batch fails alone."""
    if not steps:
        return {}
    job = defs.resolve_job_def(steps[0].stage.job)
    outcomes: dict[str, str | None] = {}
    for group in _ranges(steps, steps[0].stage.batches_per_run):
        if len(group) == 1:
            outcomes[group[0].label] = _run(instance, job, group[0], log)
            continue
        first, last = group[0].partition, group[-1].partition
        log(f"running {job.name} for {first} … {last} ({len(group)} batches)")
        message = run_job(instance, job, partition_range=(first, last))
        if message is None:
            outcomes.update({step.label: None for step in group})
        else:
            log(f"FAILED {job.name} for {first} … {last}: {message}; running its batches one by one")
            outcomes.update({step.label: _run(instance, job, step, log) for step in group})
    return outcomes


def _ranges(steps: list[Step], size: int) -> list[list[Step]]:
    """The steps (in the partitions' order) cut into runs of up to ``size`` adjacent batches."""
    groups: list[list[Step]] = []
    for step in steps:
        if groups and len(groups[-1]) < size and step.position == groups[-1][-1].position + 1:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _run(instance: DagsterInstance, job, step: Step, log: Callable[[str], None]) -> str | None:
    log(f"running {job.name}" + (f" for {step.partition}" if step.partition is not None else ""))
    message = run_job(instance, job, partition=step.partition)
    if message is not None:
        log(f"FAILED {step.label}: {message}")
    return message


def run_job(instance: DagsterInstance, job, partition: str | None = None, ops_config: dict | None = None,
            partition_range: tuple[str, str] | None = None) -> str | None:
    """One in-process run of ``job`` as ingest runs it (quiet terminal, no Dagster retries), for
    ``partition`` or the ``partition_range`` (first, last), with ``ops_config`` as the ops' run
    config: None when it succeeded, else the first line of why not."""
    run_config = {**_QUIET, "ops": ops_config} if ops_config else _QUIET
    # The host the run ran on (for recovery), and no Dagster retries: the next ingest is their retry.
    tags = {INGEST_HOST_TAG: socket.gethostname(), "dagster/max_retries": "0"}
    if partition_range is not None:
        tags[RANGE_START_TAG], tags[RANGE_END_TAG] = partition_range
    result = job.execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False, run_config=run_config, tags=tags
    )
    return None if result.success else _failure_message(result)


def _failure_message(result) -> str:
    """The first line of the user code's exception (the whole of it is in the run's event log)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None:  # the user code's exception, not Dagster's wrapper
                error = error.cause
            message = (error.message or "").strip()
            return message.splitlines()[0] if message else "step failed"
    return "run failed"


def blocking_checks(defs: Definitions, assets: Iterable[AssetKey] | None = None) -> list[AssetCheckKey]:
    """The blocking checks the definitions declare on ``assets`` (None: on any asset)."""
    wanted = None if assets is None else set(assets)
    specs = [spec for group in [*(defs.assets or []), *(defs.asset_checks or [])]
             if isinstance(group, AssetsDefinition) for spec in group.check_specs]
    return sorted({spec.key for spec in specs if spec.blocking and (wanted is None or spec.asset_key in wanted)},
                  key=lambda k: (k.asset_key.to_user_string(), k.name))


def failed_checks(defs: Definitions, instance: DagsterInstance,
                  assets: Iterable[AssetKey] | None = None) -> dict[str, str]:
    """Blocking checks (on ``assets``; None: on any) that failed on the current materialization
    of their asset, as ``{"check NAME": "its description"}``."""
    failed = {}
    for key, result in latest_check_results(instance, blocking_checks(defs, assets)).items():
        if result.evaluation.passed or result.target_storage_id is None:
            continue
        current = instance.fetch_materializations(AssetRecordsFilter(asset_key=key.asset_key), limit=1).records
        if current and current[0].storage_id == result.target_storage_id:
            failed[f"check {key.name}"] = _check_summary(result.evaluation)
    return failed


def _check_summary(evaluation) -> str:
    """A failed check in one line: its description (which states its figure), else its figures."""
    figures = ", ".join(
        f"{name} {value.value:.4g}" if isinstance(value.value, float) else f"{name} {value.value}"
        for name, value in sorted(evaluation.metadata.items())
        if isinstance(value.value, (int, float)) and not isinstance(value.value, bool)
    )
    return evaluation.description or figures or "failed"
