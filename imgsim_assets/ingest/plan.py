"""Plan an ingest: from the asset graph and the instance's event log, the job runs that are due, in run order.

The plan reads the instance's event log and never runs anything. An asset partition is stale
when it was never materialized, when a parent partition (the same one for
partitioned→partitioned, any current one for partitioned→unpartitioned) was materialized after
it or was removed, or, read from ``batch_folders``, when its folder changed
(:class:`folders.FolderVersions`). Policy comes from each asset's automation condition: assets that
are ``on_missing`` (the trained models) run only when missing, on ``retrain``, or when a training
was cut short (one is older than an on_missing parent); other automated assets run when stale;
assets without a condition run when stale if an automated asset reads them, otherwise only when
named in ``extra``. A step whose inputs a planned step will change is planned too. Each step is
one run of the first defined job that selects its assets (the runs look as they do from the UI),
or of Dagster's implicit asset job for an asset no job selects; steps run in topological order,
ties in the jobs' definition order (embed, milvus, train, shard, merge, evaluate, analyze).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AutomationCondition,
    DagsterEventType,
    DagsterInstance,
    Definitions,
)

from imgsim_assets.assets import folders
from imgsim_assets.jobs import (
    analyze_index_job,
    embed_batch_job,
    evaluate_index_job,
    index_shard_job,
    merge_index_job,
    milvus_sync_job,
    train_index_job,
)

# How the report names each job's runs, and which of its fields their successes fill.
REPORTED = {
    embed_batch_job.name: ("embed", "embedded"),
    milvus_sync_job.name: ("milvus", "milvus"),
    train_index_job.name: ("train index", "trained"),
    index_shard_job.name: ("shard", "shards"),
    merge_index_job.name: ("merge index", "merged"),
    evaluate_index_job.name: ("evaluate index", "evaluated"),
    analyze_index_job.name: ("analyze index", "analyzed"),
}
MILVUS = AssetKey("milvus_collection")  # not automated: kept current only with --milvus
IMPLICIT_JOB = "__ASSET_JOB"  # Dagster's job of all assets, for an asset no defined job selects
_ON_MISSING = AutomationCondition.on_missing()


@dataclass(frozen=True)
class Step:
    """One run of ``job`` (for ``partition``) that brings ``assets`` up to date."""

    job: str
    partition: str | None
    assets: tuple[AssetKey, ...]
    label: str  # as the report names it: "embed b1", "train index"
    due: bool  # stale before anything runs; if not, it runs only when a step in ``after`` succeeded
    after: tuple[str, ...] = ()  # labels of the planned steps that materialize what it reads


def plan(
    defs: Definitions,
    instance: DagsterInstance,
    retrain: bool = False,
    extra: Iterable[AssetKey] = (),
    removed: Iterable[str] = (),
    refresh: Iterable[AssetKey] = (),
) -> list[Step]:
    """The job runs that bring every automated asset (and ``extra``) up to date, in the order
    to run them. ``removed``: partitions deleted since the last ingest; ``refresh``: assets to
    materialize again in every partition, whatever their state (embeddings under new weights)."""
    graph = defs.resolve_asset_graph()
    ledger = Ledger(instance, graph)
    removed, refresh = set(removed), set(refresh)
    planned: dict[AssetKey, dict[str | None, bool]] = {}  # asset → partition → stale on its own
    for key in _in_scope(graph, extra):
        for partition in ledger.partitions(key):
            stale = key in refresh or _stale(graph, ledger, key, partition, retrain, bool(removed))
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


def _stale(graph, ledger: Ledger, key: AssetKey, partition: str | None, retrain: bool, removed: bool) -> bool:
    """Never materialized, asked to retrain (trained models), or a followed parent changed since."""
    own = ledger.storage_id(key, partition)
    if own == 0 or (retrain and _trained_only(graph.get(key))):
        return True
    for parent in _followed(graph, key):
        node = graph.get(parent)
        if node.is_external:
            # The one observed parent: a batch folder, changed when its version is not the one read.
            if parent == folders.batch_folders.key and ledger.folders.changed(partition):
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
            IMPLICIT_JOB,
        )
    return found


def _label(job: str, partition: str | None, assets) -> str:
    """How the report names a step: "embed b1", "train index"."""
    if job in REPORTED:
        name = REPORTED[job][0]
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


class Ledger:
    """Latest materialization storage ids per asset partition, each asset read from the event log once."""

    def __init__(self, instance: DagsterInstance, graph) -> None:
        self.instance, self.graph = instance, graph
        self._ids: dict[AssetKey, dict[str | None, int]] = {}
        self._folders: folders.FolderVersions | None = None

    @property
    def folders(self) -> folders.FolderVersions:
        """Every batch folder's observed and consumed version, read once."""
        if self._folders is None:
            self._folders = folders.FolderVersions.read(self.instance)
        return self._folders

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
