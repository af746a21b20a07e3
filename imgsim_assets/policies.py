"""How assets are scheduled against shared hardware, retried, and kept current."""

from dagster import AutomationCondition, Backoff, RetryPolicy

# Steps that want the GPU (embedding, k-means) share this pool; the instance limits every
# pool to one step at a time (dagster.yaml: concurrency.pools.default_limit).
GPU_POOL = "gpu"

# A lost worker, a full disk that was cleaned, a GPU that was busy: try again, later each time.
TRANSIENT_RETRY = RetryPolicy(max_retries=2, delay=10, backoff=Backoff.EXPONENTIAL)

# PCA, centroids and the index template are trained once there is data, then only when asked
# (the retrain_index schedule, `imgsim ingest --retrain`, the UI); retraining makes every shard
# stale, and the shards' eager condition rebuilds them.
TRAINED = AutomationCondition.on_missing()
