"""What ``imgsim ingest`` runs: the chain's jobs as a declared list of stages, in run order,
and when each is due.

A stage is one job of the code location. It is due for a partition (a batch, or the whole
collection when the stage is not per batch) when one of its assets there was never
materialized, or is older than an input it follows. A stage of trained models follows only the
other trained models (so new data does not retrain; a training cut short does) and is due on
``retrain``; the other stages follow every input the definitions declare for their assets, a
batch folder whose files changed, and batches that were removed. These are the rules the assets'
automation conditions state for the daemon (``on_missing`` for trained models, ``eager`` for the
rest); here they are read from the event log as it is, so an ingest after a killed one sees what
is stale without any state of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

from dagster import AssetKey, AssetRecordsFilter, AssetsDefinition, DagsterInstance, Definitions

from imgsim_assets import jobs
from imgsim_assets.assets import folders
from imgsim_assets.dagster_private import latest_storage_ids
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import BATCH_RUNS


@dataclass(frozen=True)
class Stage:
    """One job of the chain, as ingest runs it."""

    name: str  # as the report and the log name it: "embed", "train index"
    job: str
    assets: tuple[str, ...]  # what the job materializes
    per_batch: bool = False  # one partition of image_batches per step (else: the whole collection)
    batches_per_run: int = 1  # adjacent batches one run may cover (the assets' backfill policy)
    trained: bool = False  # trained models: due when missing, on retrain, or when cut short
    on_request: bool = False  # only when asked for (``imgsim ingest --milvus``)

    @property
    def keys(self) -> frozenset[AssetKey]:
        return frozenset(AssetKey(a) for a in self.assets)


RANGES = BATCH_RUNS.max_partitions_per_run
EMBED = Stage("embed", jobs.embed_batch_job.name, jobs.EMBED_ASSETS, per_batch=True, batches_per_run=RANGES)
MILVUS = Stage("milvus", jobs.milvus_sync_job.name, jobs.MILVUS_ASSETS, per_batch=True, on_request=True)
TRAIN = Stage("train index", jobs.train_index_job.name, jobs.TRAIN_ASSETS, trained=True)
SHARD = Stage("shard", jobs.index_shard_job.name, jobs.SHARD_ASSETS, per_batch=True, batches_per_run=RANGES)
MERGE = Stage("merge index", jobs.merge_index_job.name, jobs.MERGE_ASSETS)
EVALUATE = Stage("evaluate index", jobs.evaluate_index_job.name, jobs.EVALUATE_ASSETS, trained=True)
ANALYZE = Stage("analyze index", jobs.analyze_index_job.name, jobs.ANALYZE_ASSETS)
STAGES = (EMBED, MILVUS, TRAIN, SHARD, MERGE, EVALUATE, ANALYZE)


@dataclass(frozen=True)
class Step:
    """One stage for one partition (None: the stage is not per batch)."""

    stage: Stage
    partition: str | None
    position: int = 0  # the partition's place in the partitions' order: adjacent batches share a run

    @property
    def label(self) -> str:
        """How the report and the log name it: "embed b1", "train index"."""
        return f"{self.stage.name} {self.partition}" if self.partition is not None else self.stage.name


class Inputs:
    """Each asset's dependencies, as the definitions declare them."""

    def __init__(self, defs: Definitions) -> None:
        self.deps: dict[AssetKey, frozenset[AssetKey]] = {}
        self.partitioned: set[AssetKey] = set()
        for assets_def in defs.assets or []:
            if isinstance(assets_def, AssetsDefinition):
                for key, deps in assets_def.asset_deps.items():
                    self.deps[key] = frozenset(deps)
                    if assets_def.partitions_def is not None:
                        self.partitioned.add(key)

    def of(self, stage: Stage) -> frozenset[AssetKey]:
        """What the stage's job reads and does not materialize itself."""
        return frozenset(d for key in stage.keys for d in self.deps.get(key, ())) - stage.keys

    def materialized(self, key: AssetKey) -> bool:
        """Whether the code location materializes it (else it is observed, like the batch folders)."""
        return key in self.deps


class Ledger:
    """The latest materialization of each asset partition (by storage id), read from the event
    log once per asset; :meth:`assume_done` makes it answer as if a step had just run."""

    NOW = 2**62  # newer than every storage id

    def __init__(self, instance: DagsterInstance, inputs: Inputs) -> None:
        self.instance, self.inputs = instance, inputs
        self.batches: list[str] = image_batches.get_partition_keys(dynamic_partitions_store=instance)
        self._ids: dict[AssetKey, dict[str | None, int]] = {}

    @functools.cached_property
    def folders(self) -> folders.FolderVersions:
        """Every batch folder's observed and consumed version, read when a stage first asks
        (only the stage that reads the folders does: a few paged queries over all batches)."""
        return folders.FolderVersions.read(self.instance)

    def storage_id(self, key: AssetKey, partition: str | None) -> int:
        """Of the partition's latest materialization; 0 when there is none."""
        if key not in self._ids:
            if key in self.inputs.partitioned:
                self._ids[key] = dict(latest_storage_ids(self.instance, key))
            else:
                records = self.instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1).records
                self._ids[key] = {None: records[0].storage_id} if records else {}
        return self._ids[key].get(partition, 0)

    def newest(self, key: AssetKey, partition: str | None = None) -> int:
        """``storage_id`` of the partition, or of a partitioned asset's newest current batch when None."""
        if partition is not None or key not in self.inputs.partitioned:
            return self.storage_id(key, partition)
        return max((self.storage_id(key, b) for b in self.batches), default=0)

    def assume_done(self, step: Step) -> None:
        for key in step.stage.keys:
            self.storage_id(key, step.partition)
            self._ids[key][step.partition] = self.NOW


TRAINED_MODELS = frozenset(key for stage in STAGES if stage.trained for key in stage.keys)


def due(stage: Stage, ledger: Ledger, retrain: bool = False, removed: bool = False,
        refresh: Iterable[Stage] = ()) -> list[Step]:
    """The stage's steps that are due now, partitions in the partitions' order. ``removed``:
    batches were removed since the last ingest; ``refresh``: stages to run again everywhere."""
    partitions = ledger.batches if stage.per_batch else [None]
    return [Step(stage, p, i) for i, p in enumerate(partitions)
            if stage in refresh or any(_stale(stage, key, p, ledger, retrain, removed) for key in stage.keys)]


def _stale(stage: Stage, key: AssetKey, partition: str | None, ledger: Ledger, retrain: bool, removed: bool) -> bool:
    own = ledger.storage_id(key, partition)
    if own == 0 or (retrain and stage.trained):
        return True
    inputs = ledger.inputs
    for dep in sorted(inputs.deps.get(key, ())):
        if stage.trained and dep not in TRAINED_MODELS:
            continue
        if dep == folders.batch_folders.key:
            if ledger.folders.changed(partition):
                return True
        elif not inputs.materialized(dep):
            continue
        elif ledger.newest(dep, partition if dep in inputs.partitioned else None) > own:
            return True
        elif removed and dep in inputs.partitioned and key not in inputs.partitioned:
            return True  # it read a batch that is gone
    return False


def missing_input(step: Step, ledger: Ledger) -> str | None:
    """Why the step cannot run: an input that was never materialized (for its batch, or at all)."""
    for dep in sorted(ledger.inputs.of(step.stage)):
        if ledger.inputs.materialized(dep):
            partition = step.partition if dep in ledger.inputs.partitioned else None
            if ledger.newest(dep, partition) == 0:
                return f"{dep.to_user_string()} has not been materialized yet"
    return None


def stages_for(milvus: bool = False, stages: Iterable[Stage] | None = None) -> list[Stage]:
    """The stages an ingest runs (of ``STAGES`` unless given), in order: those on request only when asked for."""
    return [s for s in (STAGES if stages is None else stages) if milvus or not s.on_request]


def plan(defs: Definitions, instance: DagsterInstance, retrain: bool = False, milvus: bool = False,
         removed: Iterable[str] = (), refresh: Iterable[Stage] = (), stages: Iterable[Stage] | None = None) -> list[Step]:
    """The steps an ingest would run, in order, if every step succeeded. Runs nothing."""
    ledger = Ledger(instance, Inputs(defs))
    removed, refresh = bool(list(removed)), list(refresh)
    steps: list[Step] = []
    for stage in stages_for(milvus, stages):
        for step in due(stage, ledger, retrain, removed, refresh):
            steps.append(step)
            ledger.assume_done(step)
    return steps
