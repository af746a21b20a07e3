"""Sensor ``new_image_batches``: new or changed batch folders → partitions and embedding runs."""

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

from imgsim_assets.jobs import embed_batch_job
from imgsim_assets.partitions import image_batches
from imgsim_assets.resources import StorageResource, WatchResource
from imgsim_assets.watch import plan_tick


@sensor(job=embed_batch_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.STOPPED)
def new_image_batches(context: SensorEvaluationContext, storage: StorageResource, watch: WatchResource):
    """Registers each complete new batch folder under the images root as an ``image_batches``
    partition and requests its embedding run; a known batch whose files changed runs again.
    Complete = a ``_SUCCESS`` file, or no change for ``watch.quiet_seconds``. Each tick looks at
    a bounded number of folders and resumes where the previous one stopped. The partition of a
    folder that disappeared is removed (its vectors leave the index at the next merge)."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    tick = plan_tick(
        storage.images_dir,
        cursor,
        set(context.instance.get_dynamic_partitions(image_batches.name)),
        now=time.time(),
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
    if not tick.runs and not requests:
        waiting = f"; waiting for {', '.join(tick.waiting)}" if tick.waiting else ""
        return SkipReason(f"no new or changed complete batch folder{waiting}")
    return SensorResult(
        run_requests=[RunRequest(partition_key=b, run_key=f"{b}:{fp}", tags={"imgsim/folder_fingerprint": fp})
                      for b, fp in tick.runs],
        dynamic_partitions_requests=requests,
    )
