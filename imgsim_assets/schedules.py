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

from imgsim_assets.dagster_private import latest_check_results
from imgsim_assets.jobs import train_index_job

DRIFT_CHECK = AssetCheckKey(AssetKey("faiss_index"), "retraining_due")


@schedule(job=train_index_job, cron_schedule="0 3 * * 1", default_status=DefaultScheduleStatus.STOPPED)
def retrain_index(context: ScheduleEvaluationContext):
    """Weekly (Monday 03:00): if the latest ``retraining_due`` check failed, retrain; the
    shards then become stale and their eager automation rebuilds them."""
    latest = latest_check_results(context.instance, [DRIFT_CHECK]).get(DRIFT_CHECK)
    if latest is None:
        return SkipReason("no drift measured yet: faiss_index has not been checked")
    evaluation = latest.evaluation
    drift = evaluation.metadata.get("max_drift")
    if evaluation.passed:
        return SkipReason(f"no batch drifted (max drift {drift.value if drift else 'n/a'})")
    return RunRequest(run_key=f"retrain-after-check-{latest.storage_id}", tags={"imgsim/reason": "drift"})
