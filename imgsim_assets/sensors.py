"""Sensor ``new_image_batches``: new or changed batch folders → observations of ``batch_folders``,
partitions and embedding runs."""

import json
import time

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from imgsim_assets.assets import folders
from imgsim_assets.jobs import embed_batch_job
from imgsim_assets.partitions import image_batches
from imgsim_assets.resources import StorageResource, WatchResource
from imgsim_assets.watch import plan_tick


@sensor(job=embed_batch_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.STOPPED)
def new_image_batches(context: SensorEvaluationContext, storage: StorageResource, watch: WatchResource):
    """Registers each complete new batch folder under the images root as an ``image_batches``
    partition and requests its embedding run; a known batch whose folder changed (its observed
    version is not the one its manifest was built from) runs again. New folder versions are
    recorded as observations of ``batch_folders``, so the UI shows what they make stale.
    Complete = a ``_SUCCESS`` file, or no change for ``watch.quiet_seconds``. Each tick looks at
    a bounded number of folders and resumes where the previous one stopped. The partition of a
    folder that disappeared is removed (its vectors leave the index at the next merge)."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    tick = plan_tick(
        storage.images_dir,
        cursor,
        set(context.instance.get_dynamic_partitions(image_batches.name)),
        now=time.time(),
        consumed=lambda batch: folders.consumed_version(context.instance, batch),
        quiet_seconds=watch.quiet_seconds,
        max_batches=watch.max_batches_per_tick,
        time_budget_s=watch.time_budget_seconds,
    )
    context.update_cursor(json.dumps(tick.cursor, sort_keys=True))
    for name, problem in tick.invalid.items():
        context.log.warning(f"folder {name!r} cannot be a batch: {problem}")
    requests = []
    if tick.new_partitions:
        requests.append(image_batches.build_add_request(tick.new_partitions))
    if tick.removed_partitions:
        context.log.info(f"batch folders gone, removing their partitions: {', '.join(tick.removed_partitions)}")
        requests.append(image_batches.build_delete_request(tick.removed_partitions))
    observations = [folders.observation(b, version) for b, version in tick.observations]
    if not tick.runs and not requests:
        waiting = f"; waiting for {', '.join(tick.waiting)}" if tick.waiting else ""
        skip = SkipReason(f"no new or changed complete batch folder{waiting}")
        return SensorResult(skip_reason=skip, asset_events=observations) if observations else skip
    return SensorResult(
        # One run per folder version: the run key is the batch and its data version.
        run_requests=[RunRequest(partition_key=b, run_key=f"{b}:{version}", tags={"imgsim/folder_version": version})
                      for b, version in tick.runs],
        dynamic_partitions_requests=requests,
        asset_events=observations,
    )
