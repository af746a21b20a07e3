"""``imgsim ingest``: bring every automated asset up to date with the batch folders, headless.

It reads top to bottom as it runs (:func:`ingest`): **observe** the folders as the sensor does
(:func:`watch.observe_folders`: new ones become ``image_batches`` partitions, gone ones are
removed, each folder's version is recorded as an observation of ``batch_folders``), then go
down the declared stages (:mod:`.stages`: embed, milvus, train, shard, merge, evaluate,
analyze), each deciding from the event log what of it is due and running that in process with
the code location's jobs (:mod:`.runs`), and **report**, including any blocking asset check
that failed on the current materialization of its asset. One ingest at a time per instance and
host, which first recovers the runs a killed one left (:mod:`.lock`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, Definitions

from imgsim_assets.core import images
from imgsim_assets.ingest.lock import INGEST_HOST_TAG, LOCK_FILE, IngestRunning, ingest_lock, recover_abandoned_runs
from imgsim_assets.ingest.runs import failed_checks, run_job, run_steps
from imgsim_assets.ingest.stages import (
    ANALYZE, EMBED, EVALUATE, MERGE, MILVUS, SHARD, STAGES, TRAIN, Inputs, Ledger, Stage, Step, due, missing_input,
    plan, stages_for,
)
from imgsim_assets.watch import observe_folders

__all__ = [
    "INGEST_HOST_TAG", "LOCK_FILE", "STAGES", "EncoderChanged", "IngestReport", "IngestRunning", "Stage", "Step",
    "failed_checks", "ingest", "ingest_lock", "observe_folders", "plan", "recover_abandoned_runs", "run_job",
    "run_stages",
]


@dataclass
class IngestReport:
    """What one ingest found and did, stage by stage, and what failed (run order, then checks)."""

    new_batches: list[str] = field(default_factory=list)
    removed_batches: list[str] = field(default_factory=list)
    invalid_folders: dict[str, str] = field(default_factory=dict)
    done: dict[str, list[str | None]] = field(default_factory=dict)  # stage name → partitions that succeeded
    recovered: list[str] = field(default_factory=list)  # run ids of an interrupted ingest, marked failed
    failed: dict[str, str] = field(default_factory=dict)  # step label or "check NAME" → why

    @property
    def ok(self) -> bool:
        return not self.failed

    def _batches(self, stage: Stage) -> list[str]:
        return [p for p in self.done.get(stage.name, []) if p is not None]

    embedded = property(lambda self: self._batches(EMBED))
    milvus = property(lambda self: self._batches(MILVUS))
    shards = property(lambda self: self._batches(SHARD))
    trained = property(lambda self: TRAIN.name in self.done)
    merged = property(lambda self: MERGE.name in self.done)
    evaluated = property(lambda self: EVALUATE.name in self.done)
    analyzed = property(lambda self: ANALYZE.name in self.done)


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
        run_stages(defs, instance, stages_for(milvus), report, log, retrain=retrain, removed=seen.removed,
                   refresh=[EMBED] if reembed else [])
        report.failed.update(failed_checks(defs, instance))
        return report


def run_stages(defs: Definitions, instance: DagsterInstance, stages: Iterable[Stage], report: IngestReport,
               log: Callable[[str], None] = print, retrain: bool = False, removed: Iterable[str] = (),
               refresh: Iterable[Stage] = ()) -> None:
    """Each stage in turn: what of it is due now (after the stages before it ran), unless what it
    reads failed in this ingest (a half-trained model, a failed blocking check), run. A failed
    batch blocks nothing: the other batches go on."""
    inputs = Inputs(defs)
    removed, refresh = bool(list(removed)), list(refresh)
    broken: dict[AssetKey, str] = {}  # asset → the failed stage that made it (or would have, had it not been blocked)
    for stage in stages:
        ledger = Ledger(instance, inputs)
        steps = due(stage, ledger, retrain, removed, refresh)
        if not steps:
            continue
        reads = inputs.of(stage)
        reason = _blocked(defs, instance, reads, broken)
        if reason:
            broken.update({key: stage.name for key in stage.keys})
            for step in steps:
                log(f"not running {step.label}: {reason}")
            continue
        runnable = []
        for step in steps:
            missing = missing_input(step, ledger)
            if missing:
                log(f"not running {step.label}: {missing}")
            else:
                runnable.append(step)
        images.shutdown_decode_pool()  # the previous job's decode workers: an index merge needs the memory more
        outcomes = run_steps(defs, instance, runnable, log)
        for step in runnable:
            outcome = outcomes[step.label]
            if outcome is None:
                report.done.setdefault(stage.name, []).append(step.partition)
            else:
                report.failed[step.label] = outcome
                if not stage.per_batch:
                    broken.update({key: stage.name for key in stage.keys})  # a half-made model: nothing may read it


def _blocked(defs: Definitions, instance: DagsterInstance, reads: frozenset[AssetKey],
             broken: dict[AssetKey, str]) -> str | None:
    """Why a stage that reads ``reads`` must not run: a failed stage made one of them, or a
    blocking check failed on the current materialization of one."""
    failed_stage = next((broken[key] for key in sorted(reads) if key in broken), None)
    if failed_stage is not None:
        return f"{failed_stage} did not succeed"
    return next((f"{label} failed: {message}" for label, message in failed_checks(defs, instance, reads).items()), None)


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
