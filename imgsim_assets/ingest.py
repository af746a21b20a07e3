"""``imgsim ingest``: bring every automated asset up to date with the batch folders, headless.

It reads top to bottom as it runs: **observe** the folders (new ones become ``image_batches``
partitions, gone ones are removed, each folder's version is recorded as an observation of
``batch_folders``), **plan** from the definitions' asset graph which job runs are due,
**execute** them in process with the code location's jobs, and **report**, including any
blocking asset check that failed on the current materialization of its asset.

The plan reads the instance's event log and never runs anything. An asset partition is stale
when it was never materialized, when a parent partition (the same one for
partitioned→partitioned, any current one for partitioned→unpartitioned) was materialized after
it or was removed, or, read from ``batch_folders``, when its folder changed
(:func:`folders.batch_changed`). Policy comes from each asset's automation condition: assets that
are ``on_missing`` (the trained models) run only when missing, on ``retrain``, or when a training
was cut short (one is older than an on_missing parent); other automated assets run when stale;
assets without a condition run when stale if an automated asset reads them, otherwise only when
named in ``extra``. A step whose inputs a planned step will change is planned too. Each step is
one run of the first defined job that selects its assets (the runs look as they do from the UI),
or of Dagster's implicit asset job for an asset no job selects; steps run in topological order,
ties in the jobs' definition order (embed, milvus, train, shard, merge, analyze).

Execution re-decides each step just before it: a step that is planned only because of upstream
steps runs only if one of them succeeded (a batch whose embedding failed is not re-sharded); a
step downstream of a failed unpartitioned step (a half-trained model) or of a failed blocking
check is skipped, as is one whose inputs were never materialized.

One ingest at a time per instance and host (a lock file in ``DAGSTER_HOME``). An ingest
that was killed leaves runs marked as started, and the ``gpu`` pool slot one of them held
would block every later run; the next ingest, holding the lock, knows those runs are dead,
marks them failed and frees their slots. Artifacts are published atomically and content
addressed, so redoing the interrupted work converges on what an uninterrupted run builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AutomationCondition,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    RunsFilter,
)

from imgsim_assets.assets import folders
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

# How each job's runs are named in the report and which report field they fill.
_REPORTED = {
    embed_batch_job.name: ("embed", "embedded"),
    milvus_sync_job.name: ("milvus", "milvus"),
    train_index_job.name: ("train index", "trained"),
    index_shard_job.name: ("shard", "shards"),
    merge_index_job.name: ("merge index", "merged"),
    analyze_index_job.name: ("analyze index", "analyzed"),
}
MILVUS = AssetKey("milvus_collection")  # not automated: kept current only with --milvus
_IMPLICIT_JOB = "__ASSET_JOB"  # Dagster's job of all assets, for an asset no defined job selects
_ON_MISSING = AutomationCondition.on_missing()


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
    analyzed: bool = False
    milvus: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # run ids of an interrupted ingest, marked failed
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Step:
    """One run of ``job`` (for ``partition``) that brings ``assets`` up to date."""

    job: str
    partition: str | None
    assets: tuple[AssetKey, ...]
    label: str  # as the report names it: "embed b1", "train index"
    due: bool  # stale before anything runs; if not, it runs only when a step in ``after`` succeeded
    after: tuple[str, ...] = ()  # labels of the planned steps that materialize what it reads


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
        seen = observe_folders(instance, images_dir, log)
        report.new_batches, report.removed_batches, report.invalid_folders = seen.new, seen.removed, seen.invalid
        steps = plan(defs, instance, retrain=retrain, extra=[MILVUS] if milvus else [], removed=seen.removed)
        outcomes = execute(defs, instance, steps, log)
        _fill_report(report, steps, outcomes)
        report.failed.update(failed_checks(defs, instance))
        return report


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
    for batch in batches:
        version = folders.folder_version(images_dir / batch)
        if version != folders.observed_version(instance, batch):
            instance.report_runless_asset_event(folders.observation(batch, version))
    return Folders(batches, new, removed, invalid)


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


def plan(
    defs: Definitions,
    instance: DagsterInstance,
    retrain: bool = False,
    extra: Iterable[AssetKey] = (),
    removed: Iterable[str] = (),
) -> list[Step]:
    """The job runs that bring every automated asset (and ``extra``) up to date, in the order
    to run them. ``removed``: partitions deleted since the last ingest."""
    graph = defs.resolve_asset_graph()
    ledger = _Ledger(instance, graph)
    removed = set(removed)
    planned: dict[AssetKey, dict[str | None, bool]] = {}  # asset → partition → stale on its own
    for key in _in_scope(graph, extra):
        for partition in ledger.partitions(key):
            stale = _stale(graph, ledger, key, partition, retrain, bool(removed))
            if stale or any(_planned(graph, planned, key, partition, p) for p in _followed(graph, key)):
                planned.setdefault(key, {})[partition] = stale
    return _steps(defs, graph, planned)


def _in_scope(graph, extra: Iterable[AssetKey]) -> list[AssetKey]:
    """Assets with an automation condition, ``extra``, and the assets they read, in topological order."""
    todo = [k for k in graph.materializable_asset_keys if graph.get(k).automation_condition is not None]
    todo += list(extra)
    scope: set[AssetKey] = set()
    while todo:
        key = todo.pop()
        if key not in scope and graph.get(key).is_materializable:
            scope.add(key)
            todo += graph.get(key).parent_keys
    return [k for k in graph.toposorted_asset_keys if k in scope]


def _trained_only(node) -> bool:
    """Whether the asset is automated only when missing (a trained model): it is not stale
    because its data is newer, only on request or when another trained model is."""
    return node.automation_condition == _ON_MISSING


def _followed(graph, key: AssetKey) -> list[AssetKey]:
    """The parents whose changes make ``key`` stale, by its policy."""
    parents = graph.get(key).parent_keys
    if _trained_only(graph.get(key)):
        return [p for p in parents if _trained_only(graph.get(p))]
    return list(parents)


def _same_partitions(graph, key: AssetKey, parent: AssetKey) -> bool:
    """Whether partition P of ``key`` reads partition P of ``parent`` (otherwise: all of them)."""
    child_partitions = graph.get(key).partitions_def
    return child_partitions is not None and child_partitions == graph.get(parent).partitions_def


def _stale(graph, ledger: _Ledger, key: AssetKey, partition: str | None, retrain: bool, removed: bool) -> bool:
    """Never materialized, asked to retrain (trained models), or a followed parent changed since."""
    own = ledger.storage_id(key, partition)
    if own == 0 or (retrain and _trained_only(graph.get(key))):
        return True
    for parent in _followed(graph, key):
        node = graph.get(parent)
        if node.is_external:
            # The one observed parent: a batch folder, changed when its version is not the one read.
            if parent == folders.batch_folders.key and folders.batch_changed(ledger.instance, partition):
                return True
        elif ledger.newest(parent, partition if _same_partitions(graph, key, parent) else None) > own:
            return True
        elif removed and node.is_partitioned and not graph.get(key).is_partitioned:
            return True  # it read a partition that is gone
    return False


def _planned(graph, planned: dict, key: AssetKey, partition: str | None, parent: AssetKey) -> bool:
    """Whether the plan materializes what ``key``'s ``partition`` reads of ``parent``."""
    parts = planned.get(parent, {})
    return partition in parts if _same_partitions(graph, key, parent) else bool(parts)


def _steps(defs: Definitions, graph, planned: dict[AssetKey, dict[str | None, bool]]) -> list[Step]:
    """Planned asset partitions grouped into runs of the jobs that select them, in run order."""
    jobs = _jobs_by_asset(defs, graph, planned)
    groups: dict[tuple[str, str | None], dict[AssetKey, bool]] = {}
    for key, parts in planned.items():
        for partition, stale in parts.items():
            assets = groups.setdefault((jobs[key], partition), {})
            assets[key] = assets.get(key, False) or stale
    labels = {group: _label(*group, assets) for group, assets in groups.items()}
    steps = []
    for (job, partition), assets in groups.items():
        after = {labels[(jobs[p], q)]
                 for key in assets for p in graph.get(key).parent_keys if p in planned
                 for q in planned[p] if q == partition or not _same_partitions(graph, key, p)}
        after.discard(labels[(job, partition)])
        steps.append(Step(job, partition, tuple(sorted(assets)), labels[(job, partition)], any(assets.values()),
                          tuple(sorted(after))))
    return _run_order(steps, [j.name for j in defs.jobs or []])


def _jobs_by_asset(defs: Definitions, graph, keys: Iterable[AssetKey]) -> dict[AssetKey, str]:
    """For each asset, the first defined job that materializes it (Dagster's implicit job if none)."""
    selected = [(job.name, defs.resolve_job_def(job.name)) for job in defs.jobs or []]
    found = {}
    for key in keys:
        found[key] = next(
            (name for name, job in selected
             if key in job.asset_layer.executable_asset_keys and job.partitions_def == graph.get(key).partitions_def),
            _IMPLICIT_JOB,
        )
    return found


def _label(job: str, partition: str | None, assets) -> str:
    """How the report names a step: "embed b1", "train index"."""
    if job in _REPORTED:
        name = _REPORTED[job][0]
    else:
        name = "materialize " + ", ".join(k.to_user_string() for k in sorted(assets))
    return f"{name} {partition}" if partition is not None else name


def _run_order(steps: list[Step], job_order: list[str]) -> list[Step]:
    """Steps after the steps they read from; otherwise in the jobs' definition order, then by partition."""
    rank = {name: i for i, name in enumerate(job_order)}

    def priority(step: Step):
        return rank.get(step.job, len(rank)), step.partition or "", step.label

    waiting = {s.label: set(s.after) for s in steps}
    by_label = {s.label: s for s in steps}
    ready = [(priority(s), s.label) for s in steps if not s.after]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, label = heapq.heappop(ready)
        ordered.append(by_label[label])
        for other, needs in waiting.items():
            if label in needs:
                needs.discard(label)
                if not needs:
                    heapq.heappush(ready, (priority(by_label[other]), other))
    return ordered


class _Ledger:
    """Latest materialization storage ids per asset partition, each asset read from the event log once."""

    def __init__(self, instance: DagsterInstance, graph) -> None:
        self.instance, self.graph = instance, graph
        self._ids: dict[AssetKey, dict[str | None, int]] = {}

    def partitions(self, key: AssetKey) -> list[str | None]:
        """The asset's current partitions, sorted ([None] when unpartitioned)."""
        partitions_def = self.graph.get(key).partitions_def
        if partitions_def is None:
            return [None]
        return sorted(partitions_def.get_partition_keys(dynamic_partitions_store=self.instance))

    def storage_id(self, key: AssetKey, partition: str | None) -> int:
        """Storage id of the latest materialization of the partition (0: never materialized)."""
        if key not in self._ids:
            self._ids[key] = self._read(key)
        return self._ids[key].get(partition, 0)

    def newest(self, key: AssetKey, partition: str | None = None) -> int:
        """``storage_id`` of that partition, or of the asset's newest current partition when None."""
        if partition is not None or not self.graph.get(key).is_partitioned:
            return self.storage_id(key, partition)
        return max((self.storage_id(key, p) for p in self.partitions(key)), default=0)

    def _read(self, key: AssetKey) -> dict[str | None, int]:
        """Latest storage id per partition (one query for a partitioned asset)."""
        if self.graph.get(key).is_partitioned:
            return dict(self.instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION))
        records = self.instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1).records
        return {None: records[0].storage_id} if records else {}


def execute(
    defs: Definitions, instance: DagsterInstance, steps: list[Step], log: Callable[[str], None] = print
) -> dict[str, str | None]:
    """Run the steps in order, each as an in-process run of its job. Returns, for each step that
    ran, None when it succeeded or the first line of why it failed; skipped steps are absent."""
    graph = defs.resolve_asset_graph()
    outcomes: dict[str, str | None] = {}
    broken: set[str] = set()  # failed unpartitioned steps, and the steps skipped because of one
    for step in steps:
        job = _job_def(defs, step)
        blocked = _blocked_by(graph, instance, step, job, broken)
        reason = blocked or _needless(step, outcomes) or _missing_input(graph, instance, step, job)
        if blocked:
            broken.add(step.label)
        if reason:
            log(f"not running {step.label}: {reason}")
            continue
        outcomes[step.label] = _run(instance, step, job, log)
        if outcomes[step.label] is not None and step.partition is None:
            broken.add(step.label)  # a half-made model or index: nothing may read it
    return outcomes


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


def _missing_input(graph, instance: DagsterInstance, step: Step, job) -> str | None:
    """An asset the job reads that was never materialized (for the step's partition, or at all)."""
    ledger = _Ledger(instance, graph)
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
    if step.job == _IMPLICIT_JOB:
        return defs.resolve_implicit_job_def_def_for_assets(list(step.assets)).get_subset(
            asset_selection=set(step.assets))
    return defs.resolve_job_def(step.job)


def _run(instance: DagsterInstance, step: Step, job, log: Callable[[str], None]) -> str | None:
    """One in-process run of the step's job: None when it succeeded, else why it failed."""
    log(f"running {step.job}" + (f" for {step.partition}" if step.partition else ""))
    result = job.execute_in_process(
        instance=instance, partition_key=step.partition, raise_on_error=False, run_config=_QUIET, tags=_run_tags()
    )
    if result.success:
        return None
    message = _failure_message(result)
    log(f"FAILED {step.label}: {message}")
    return message


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


def _fill_report(report: IngestReport, steps: list[Step], outcomes: dict[str, str | None]) -> None:
    """What ran, per stage, and what failed, in run order."""
    for step in steps:
        if step.label not in outcomes:
            continue
        if outcomes[step.label] is not None:
            report.failed[step.label] = outcomes[step.label]
        elif step.job in _REPORTED:
            name = _REPORTED[step.job][1]
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


