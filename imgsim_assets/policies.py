"""How assets are scheduled against shared hardware, retried, and kept current."""

import warnings

from dagster import AutomationCondition, BackfillPolicy, Backoff, BetaWarning, RetryPolicy

# Steps that want the GPU (embedding, k-means) share this pool; the instance limits every
# pool to one step at a time (dagster.yaml: concurrency.pools.default_limit).
GPU_POOL = "gpu"

# On Kubernetes (deploy/: IMGSIM_EXECUTOR=k8s, one pod per step) a GPU step's pod asks for one GPU.
# Elsewhere the tag is inert. Clusters whose GPU nodes need a selector or a taint of their own
# extend the pod spec here, e.g.
#     "pod_spec_config": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
#                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
GPU_STEP_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}
# The runs of jobs with GPU steps carry this tag; the deployment caps how many run at once
# (deploy/values.yaml: concurrency.runs.tagConcurrencyLimits), so queued runs wait without holding a pod.
GPU_RUN_TAGS = {"imgsim/gpu": "true"}

# A lost worker, a full disk that was cleaned, a GPU that was busy: try again, later each time.
TRANSIENT_RETRY = RetryPolicy(max_retries=2, delay=10, backoff=Backoff.EXPONENTIAL)

# PCA, centroids and the index template are trained once there is data, then only when asked
# (the retrain_index schedule, `imgsim ingest --retrain`, the UI); retraining makes every shard
# stale, and the shards' eager condition rebuilds them.
TRAINED = AutomationCondition.on_missing()

# When the new_image_batches sensor takes a folder without ``_SUCCESS`` as complete (no change
# for this long), and how much of the images root one tick looks at (``WatchResource``).
QUIET_SECONDS = 60.0
MAX_BATCHES_PER_TICK = 25
TIME_BUDGET_SECONDS = 20.0

# A batch asset handles a range of batches in one run (``context.partition_keys``), each written
# to its own files: a Dagster run costs about 0.3 s of orchestration, which one run per batch pays
# per batch. ``imgsim ingest`` and the UI's backfills run up to this many batches per run.
BATCH_RUNS = BackfillPolicy.multi_run(max_partitions_per_run=25)
# Dagster marks the parameter beta and says so on every import; the range runs it enables are
# tested here (test_ingest_ranges.py), so the notice would only be noise in every CLI command.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=BetaWarning)
