"""Schedule ``retrain_index``: retrain PCA, centroids and the index template when drift says so."""

from dagster import (
    AssetCheckKey,
    AssetKey,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from imgsim_assets.jobs import train_index_job

DRIFT_CHECK = AssetCheckKey(AssetKey("faiss_index"), "retraining_due")


@schedule(job=train_index_job, cron_schedule="0 3 * * 1", default_status=DefaultScheduleStatus.STOPPED)
def retrain_index(context: ScheduleEvaluationContext):
    """Weekly (Monday 03:00): if the latest ``retraining_due`` check failed, retrain; the
    shards then become stale and their eager automation rebuilds them."""
    record = context.instance.event_log_storage.get_latest_asset_check_execution_by_key([DRIFT_CHECK]).get(DRIFT_CHECK)
    evaluation = record.event.asset_check_evaluation if record is not None and record.event is not None else None
    if evaluation is None:
        return SkipReason("no drift measured yet: faiss_index has not been checked")
    drift = evaluation.metadata.get("max_drift")
    if evaluation.passed:
        return SkipReason(f"no batch drifted (max drift {drift.value if drift else 'n/a'})")
    return RunRequest(run_key=f"retrain-after-check-{record.id}", tags={"imgsim/reason": "drift"})
