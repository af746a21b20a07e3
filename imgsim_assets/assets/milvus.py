"""Each batch's embeddings upserted into Milvus, for search beyond one machine."""


import pyarrow as pa
from dagster import AssetExecutionContext, AssetIn, MaterializeResult, asset

from imgsim_assets.core import milvus, tables
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import TRANSIENT_RETRY
from imgsim_assets.resources import MilvusResource, StorageResource


@asset(
    ins={"image_embeddings": AssetIn()},
    partitions_def=image_batches,
    group_name="downstream",
    kinds={"milvus"},
    retry_policy=TRANSIENT_RETRY,
)
def milvus_collection(
    context: AssetExecutionContext, image_embeddings: pa.Table, milvus_db: MilvusResource, storage: StorageResource
) -> MaterializeResult:
    """The batch's raw DINOv2 vectors upserted into a Milvus collection (one row per image_id,
    with batch and path); ids that left the batch are deleted. Milvus Lite file by default,
    a server or cluster by URI (`imgsim search --backend milvus` reads it)."""
    uri = milvus_db.resolved_uri(storage.data_dir)
    client = milvus.connect(uri, milvus_db.token, milvus_db.timeout_seconds)
    try:
        vectors = tables.embedding_matrix(image_embeddings)
        provenance = tables.provenance_of(image_embeddings.schema)
        milvus.ensure_collection(client, milvus_db.collection, vectors.shape[1], provenance, milvus_db.index_type)
        upserted, removed = milvus.upsert_batch(
            client, milvus_db.collection, context.partition_key, image_embeddings.column("image_id").to_numpy(),
            vectors, image_embeddings.column("path").to_pylist(),
        )
        total = milvus.count(client, milvus_db.collection)
    finally:
        client.close()
    return MaterializeResult(
        metadata={"uri": uri, "collection": milvus_db.collection, "upserted": upserted, "removed": removed,
                  "collection_rows": total}
    )
