"""Execute a plan: in-process runs of its steps' jobs (one run per range of adjacent batches),
each step re-decided just before it; and the failed blocking checks.

Execution re-decides each step just before it: a step that is planned only because of upstream
steps runs only if one of them succeeded (a batch whose embedding failed is not re-sharded); a
step downstream of a failed unpartitioned step (a half-trained model) or of a failed blocking
check is skipped, as is one whose inputs were never materialized.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable, Iterable

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, Definitions

from imgsim_assets.core import images
from imgsim_assets.ingest.lock import INGEST_HOST_TAG
from imgsim_assets.ingest.plan import IMPLICIT_JOB, REPORTED, Ledger, Step

if TYPE_CHECKING:
    from imgsim_assets.ingest import IngestReport

# The run tags of a run over a range of partitions (as Dagster's backfills set them).
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"

# Step-level DEBUG events stay in the run's event log (and the UI); the terminal gets INFO.
_QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def execute(
    defs: Definitions, instance: DagsterInstance, steps: list[Step], log: Callable[[str], None] = print
) -> dict[str, str | None]:
    """Run the steps in order, each as an in-process run of its job. Returns, for each step that
    ran, None when it succeeded or the first line of why it failed; skipped steps are absent.

    Consecutive steps of one job for adjacent partitions run as one run over the range (up to
    the assets' ``BackfillPolicy``), since a run costs about as much to orchestrate as a small
    batch costs to compute. A range that fails is run again batch by batch, so that one bad
    batch fails alone."""
    graph = defs.resolve_asset_graph()
    outcomes: dict[str, str | None] = {}
    broken: set[str] = set()  # failed unpartitioned steps, and the steps skipped because of one
    pending: list[Step] = []  # runnable steps of one job for adjacent partitions, not run yet
    positions: dict[str, dict[str, int]] = {}  # job → partition → its place in the partitions' order

    ledger = Ledger(instance, graph)  # what is materialized: read again after every run
    latest_job = None

    def entering(job_name: str) -> None:
        """Before a run of another job: stop the decode workers the previous job started (the
        process-wide pool keeps them between runs, about 0.6 GB each; an index merge at a
        million images needs that memory more)."""
        nonlocal latest_job
        if job_name != latest_job:
            images.shutdown_decode_pool()
            latest_job = job_name

    def flush() -> None:
        nonlocal ledger
        if pending:
            entering(pending[0].job)
            outcomes.update(_run_range(instance, list(pending), _job_def(defs, pending[0]), log))
            pending.clear()
            ledger = Ledger(instance, graph)

    for step in steps:
        job = _job_def(defs, step)
        if step.partition is not None and step.job not in positions:
            keys = job.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            positions[step.job] = {key: i for i, key in enumerate(keys)}
        if pending and not _extends(graph, job, positions.get(step.job, {}), pending, step):
            flush()
        blocked = _blocked_by(graph, instance, step, job, broken)
        reason = blocked or _needless(step, outcomes) or _missing_input(graph, ledger, step, job)
        if blocked:
            broken.add(step.label)
        if reason:
            log(f"not running {step.label}: {reason}")
            continue
        if step.partition is not None:
            pending.append(step)
            continue
        entering(step.job)
        outcomes[step.label] = _run(instance, step, job, log)
        ledger = Ledger(instance, graph)
        if outcomes[step.label] is not None:
            broken.add(step.label)  # a half-made model or index: nothing may read it
    flush()
    return outcomes


def _extends(graph, job, position: dict[str, int], pending: list[Step], step: Step) -> bool:
    """Whether ``step`` can join the pending range: same job, the next partition, room left."""
    last = pending[-1]
    if step.job != last.job or step.partition is None or len(pending) >= _range_limit(graph, job):
        return False
    return position.get(step.partition, -2) == position.get(last.partition, -3) + 1


def _range_limit(graph, job) -> int:
    """How many partitions one run of ``job`` may cover: the smallest ``max_partitions_per_run``
    of its assets' backfill policies (1 for an asset without one: it handles one partition)."""
    limits = []
    for key in job.asset_layer.executable_asset_keys:
        policy = graph.get(key).backfill_policy
        limits.append(1 if policy is None else policy.max_partitions_per_run or 10**9)
    return min(limits, default=1)


def _run_range(instance: DagsterInstance, steps: list[Step], job, log: Callable[[str], None]) -> dict[str, str | None]:
    """One run of ``job`` over the steps' partitions (adjacent, in partition order); if it fails,
    one run per partition."""
    if len(steps) == 1:
        return {steps[0].label: _run(instance, steps[0], job, log)}
    first, last = steps[0].partition, steps[-1].partition
    log(f"running {steps[0].job} for {first} … {last} ({len(steps)} batches)")
    message = run_job(instance, job, partition_range=(first, last))
    if message is None:
        return {step.label: None for step in steps}
    log(f"FAILED {steps[0].job} for {first} … {last}: {message}; running its batches one by one")
    return {step.label: _run(instance, step, job, log) for step in steps}


def _blocked_by(graph, instance: DagsterInstance, step: Step, job, broken: set[str]) -> str | None:
    """A failed unpartitioned step it reads from, or a failed blocking check on an asset it reads.
    (A failed batch blocks nothing: the others go on.)"""
    failed = [label for label in step.after if label in broken]
    if failed:
        return f"{failed[0]} did not succeed"
    gate = failed_checks_of(graph, instance, _inputs(graph, job))
    return next((f"{label} failed: {message}" for label, message in gate.items()), None)


def _needless(step: Step, outcomes: dict[str, str | None]) -> str | None:
    """Planned only for what upstream steps would change, and none of them succeeded."""
    if step.due or any(label in outcomes and outcomes[label] is None for label in step.after):
        return None
    return "nothing it reads changed"


def _missing_input(graph, ledger: Ledger, step: Step, job) -> str | None:
    """An asset the job reads that was never materialized (for the step's partition, or at all)."""
    for parent in sorted(_inputs(graph, job)):
        node = graph.get(parent)
        partition = step.partition if node.is_partitioned else None
        if not node.is_external and ledger.newest(parent, partition) == 0:
            return f"{parent.to_user_string()} has not been materialized yet"
    return None


def _inputs(graph, job) -> set[AssetKey]:
    """The assets a job reads and does not materialize itself."""
    assets = job.asset_layer.executable_asset_keys
    return {p for key in assets for p in graph.get(key).parent_keys if p not in assets}


def _job_def(defs: Definitions, step: Step):
    """The job that runs ``step``: the defined one, or Dagster's implicit job cut to its assets."""
    if step.job == IMPLICIT_JOB:
        return defs.resolve_implicit_job_def_def_for_assets(list(step.assets)).get_subset(
            asset_selection=set(step.assets))
    return defs.resolve_job_def(step.job)


def _run(instance: DagsterInstance, step: Step, job, log: Callable[[str], None]) -> str | None:
    """One in-process run of the step's job: None when it succeeded, else why it failed."""
    log(f"running {step.job}" + (f" for {step.partition}" if step.partition else ""))
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
    tags = _run_tags()
    if partition_range is not None:
        tags[RANGE_START_TAG], tags[RANGE_END_TAG] = partition_range
    result = job.execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False, run_config=run_config, tags=tags
    )
    return None if result.success else _failure_message(result)


def _run_tags() -> dict[str, str]:
    """Ingest's runs: the host they ran on, and no Dagster retries (the next ingest is their retry)."""
    return {INGEST_HOST_TAG: socket.gethostname(), "dagster/max_retries": "0"}


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


def fill_report(report: IngestReport, steps: list[Step], outcomes: dict[str, str | None]) -> None:
    """What ran, per stage, and what failed, in run order."""
    for step in steps:
        if step.label not in outcomes:
            continue
        if outcomes[step.label] is not None:
            report.failed[step.label] = outcomes[step.label]
        elif step.job in REPORTED:
            name = REPORTED[step.job][1]
            if isinstance(getattr(report, name), list):
                getattr(report, name).append(step.partition)
            else:
                setattr(report, name, True)


def failed_checks(defs: Definitions, instance: DagsterInstance) -> dict[str, str]:
    """Blocking asset checks that failed on the current materialization of their asset,
    as ``{"check NAME": "its description"}``."""
    graph = defs.resolve_asset_graph()
    return failed_checks_of(graph, instance, graph.materializable_asset_keys)


def failed_checks_of(graph, instance: DagsterInstance, assets: Iterable[AssetKey]) -> dict[str, str]:
    """:func:`failed_checks` for the blocking checks of ``assets``."""
    assets = set(assets)
    keys = [k for k in graph.asset_check_keys if k.asset_key in assets and graph.get_check_spec(k).blocking]
    if not keys:
        return {}
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    failed = {}
    for key in keys:
        record = latest.get(key)
        evaluation = record.event.asset_check_evaluation if record is not None and record.event is not None else None
        if evaluation is None or evaluation.passed or evaluation.target_materialization_data is None:
            continue
        current = instance.fetch_materializations(AssetRecordsFilter(asset_key=key.asset_key), limit=1).records
        if current and current[0].storage_id == evaluation.target_materialization_data.storage_id:
            failed[f"check {key.name}"] = _check_summary(evaluation)
    return failed


def _check_summary(evaluation) -> str:
    """A failed check in one line: its description (which states its figure), else its figures."""
    figures = ", ".join(
        f"{name} {value.value:.4g}" if isinstance(value.value, float) else f"{name} {value.value}"
        for name, value in sorted(evaluation.metadata.items())
        if isinstance(value.value, (int, float)) and not isinstance(value.value, bool)
    )
    return evaluation.description or figures or "failed"
