"""Jobs: the stages of the main chain, runnable one partition at a time, and the query job."""

from dagster import AssetSelection, define_asset_job

from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import GPU_RUN_TAGS

# What each job materializes (``imgsim ingest``'s stages name the same tuples).
EMBED_ASSETS = ("raw_images", "cropped_tensors", "image_embeddings")
TRAIN_ASSETS = ("pca_model", "cluster_centroids", "index_template")
SHARD_ASSETS = ("faiss_index_shards",)
MERGE_ASSETS = ("faiss_index",)
MILVUS_ASSETS = ("milvus_collection",)
EVALUATE_ASSETS = ("retrieval_eval",)
ANALYZE_ASSETS = ("near_duplicates", "image_clusters")

embed_batch_job = define_asset_job(
    "embed_batch",
    selection=AssetSelection.assets(*EMBED_ASSETS),
    partitions_def=image_batches,
    description="Manifest, pixels and embeddings of one image batch.",
    tags=GPU_RUN_TAGS,
)
train_index_job = define_asset_job(
    "train_index",
    selection=AssetSelection.assets(*TRAIN_ASSETS),
    description="Fit PCA, k-means centroids and the sized, trained index template on all batches. Makes every shard stale.",
    tags=GPU_RUN_TAGS,
)
index_shard_job = define_asset_job(
    "index_shard",
    selection=AssetSelection.assets(*SHARD_ASSETS),
    partitions_def=image_batches,
    description="Encode one batch into its IVF shard with the current PCA and centroids.",
)
merge_index_job = define_asset_job(
    "merge_index",
    selection=AssetSelection.assets(*MERGE_ASSETS),
    description="Merge all shards into the searchable faiss_index and measure its recall.",
)
milvus_sync_job = define_asset_job(
    "milvus_sync",
    selection=AssetSelection.assets(*MILVUS_ASSETS),
    partitions_def=image_batches,
    description="Upsert one batch's embeddings into the Milvus collection.",
)
evaluate_index_job = define_asset_job(
    "evaluate_index",
    selection=AssetSelection.assets(*EVALUATE_ASSETS),
    description="Edited copies of sampled images searched in faiss_index: recall, mAP and the calibrated duplicate threshold.",
)
compare_encoders_job = define_asset_job(
    "compare_encoders",
    selection=AssetSelection.assets("encoder_comparison"),
    description="The retrieval evaluation for each encoder option (pooling, resolution, PCA / whitening): one table.",
)
analyze_index_job = define_asset_job(
    "analyze_index",
    selection=AssetSelection.assets(*ANALYZE_ASSETS),
    description="Near-duplicate groups (range search on faiss_index) and every image's cluster.",
)
similar_images_job = define_asset_job(
    "similar_images_job",
    selection=AssetSelection.assets("similar_images"),
    description="Load faiss_index and answer every image of a query folder.",
)

# In the order `imgsim ingest` runs them where the asset graph leaves it free.
ALL_JOBS = [embed_batch_job, milvus_sync_job, train_index_job, index_shard_job, merge_index_job, evaluate_index_job,
            analyze_index_job, similar_images_job, compare_encoders_job]
