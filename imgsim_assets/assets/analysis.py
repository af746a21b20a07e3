"""What the index says about the collection: near-duplicate groups and cluster membership."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, AutomationCondition, Config, MetadataValue, asset
from pydantic import Field

from imgsim_assets.core import index as ix
from imgsim_assets.core import plots, tables
from imgsim_assets.assets.index import indexed_embeddings
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.resources import StorageResource


class NearDuplicatesConfig(Config):
    threshold: float = Field(default=0.95, description="cosine similarity (in the index's space) at or above "
                             "which two images count as near-duplicates")
    groups_shown: int = Field(default=4, description="groups drawn as thumbnails in the metadata")


def _distinct_embeddings(files: dict[str, pq.ParquetFile]):
    """``(ids, vectors)`` chunks over all batches, each image_id once."""
    return ix.distinct_chunks(tables.iter_embeddings([f for _, f in sorted(files.items())]))


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


@asset(
    ins={"faiss_index": AssetIn(), "image_embeddings": AssetIn()},
    io_manager_key="parquet_io_manager",
    group_name="downstream",
    kinds={"faiss", "parquet"},
    automation_condition=AutomationCondition.eager(),
)
def near_duplicates(
    context: AssetExecutionContext,
    config: NearDuplicatesConfig,
    faiss_index: ImageIndex,
    image_embeddings: dict[str, pq.ParquetFile],
    storage: StorageResource,
) -> pa.Table:
    """Pairs of distinct images at least ``threshold`` similar (range search on faiss_index at
    its nprobe), grouped into connected components: image_id_a < image_id_b, similarity,
    group (0 = largest), and the first path of each."""
    ivf = faiss_index.ivf
    a, b, sims = [], [], []
    for ids, vectors in _distinct_embeddings(indexed_embeddings(faiss_index, image_embeddings)):
        if not len(ids):
            continue
        lims, scores, found = ivf.range_search(faiss_index.to_index_space(vectors), config.threshold)
        query = np.repeat(ids, np.diff(lims.astype(np.int64)))
        keep = query < found  # each pair once, never an image with itself
        a.append(query[keep])
        b.append(found[keep])
        sims.append(scores[keep])
    a, b, sims = _concat(a, np.int64), _concat(b, np.int64), _concat(sims, np.float32)
    groups = ix.connected_groups(a, b)
    group = np.array([groups[i] for i in a.tolist()], dtype=np.int64)
    describe = faiss_index.describe
    table = pa.table(
        {
            "image_id_a": pa.array(a, pa.int64()),
            "image_id_b": pa.array(b, pa.int64()),
            "similarity": pa.array(sims, pa.float32()),
            "group": pa.array(group, pa.int64()),
            "path_a": [describe(int(i))[0] for i in a],
            "path_b": [describe(int(i))[0] for i in b],
        }
    ).sort_by([("group", "ascending"), ("similarity", "descending")])
    members: dict[int, list[int]] = {}
    for image_id, g in sorted(groups.items(), key=lambda kv: kv[1]):
        members.setdefault(g, []).append(image_id)
    shown = [[plots.source_file(storage.images_dir, describe(i)[0]) for i in members[g][:6]]
             for g in sorted(members)[: config.groups_shown]]
    metadata = {
        "num_pairs": table.num_rows,
        "num_groups": len(members),
        "images_in_groups": len(groups),
        "largest_group": max((len(m) for m in members.values()), default=0),
        "threshold": config.threshold,
    }
    if shown:
        metadata["groups"] = MetadataValue.md(plots.markdown_image(plots.thumbnail_grid(shown), "near-duplicate groups"))
    context.add_output_metadata(metadata)
    return table


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn(), "cluster_centroids": AssetIn()},
    io_manager_key="parquet_io_manager",
    group_name="downstream",
    kinds={"faiss", "parquet"},
    automation_condition=AutomationCondition.eager(),
)
def image_clusters(
    context: AssetExecutionContext,
    image_embeddings: dict[str, pq.ParquetFile],
    pca_model: ix.PcaModel,
    cluster_centroids: np.ndarray,
) -> pa.Table:
    """The k-means cluster of every distinct image (image_id, cluster, similarity to its
    centroid), from the same PCA and centroids as the index."""
    ids, clusters, sims = [], [], []
    for chunk_ids, vectors in _distinct_embeddings(image_embeddings):
        c, s = ix.nearest_centroid(pca_model.transform(vectors), cluster_centroids)
        ids.append(chunk_ids)
        clusters.append(c)
        sims.append(s)
    ids, clusters, sims = _concat(ids, np.int64), _concat(clusters, np.int64), _concat(sims, np.float32)
    sizes = np.bincount(clusters, minlength=len(cluster_centroids))
    context.add_output_metadata(
        {
            "num_images": len(ids),
            "num_clusters": len(cluster_centroids),
            "largest_cluster": int(sizes.max()) if len(sizes) else 0,
            "empty_clusters": int((sizes == 0).sum()),
            "cluster_sizes": MetadataValue.md(plots.markdown_image(plots.cluster_sizes(sizes), "cluster sizes")),
        }
    )
    return pa.table({"image_id": pa.array(ids, pa.int64()), "cluster": pa.array(clusters, pa.int32()),
                     "similarity": pa.array(sims, pa.float32())})
