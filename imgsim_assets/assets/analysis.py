"""What the index says about the collection: near-duplicate groups and cluster membership."""

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, AutomationCondition, Config, MetadataValue, asset
from pydantic import Field

from imgsim_assets.core import duplicates, plots, tables
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core import index as ix
from imgsim_assets.assets.index import indexed_embeddings
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.resources import StorageResource


class NearDuplicatesConfig(Config):
    threshold: Optional[float] = Field(default=None, description="cosine similarity (in the index's space) at or "
                                       "above which two images are near-duplicates; default: the one retrieval_eval "
                                       "calibrated")
    grouping: str = Field(default="auto", description="representative (every member is paired with its group's "
                          "representative), connected (connected components) or auto (the one retrieval_eval "
                          "measured best)")
    groups_shown: int = Field(default=4, description="groups drawn as thumbnails in the metadata")


def choose_threshold(config: NearDuplicatesConfig, evaluation: ev.Evaluation) -> tuple[float, str]:
    """The threshold to group at, and why."""
    if config.threshold is not None:
        return config.threshold, "set in config"
    t = evaluation.threshold
    weights = " (RANDOM WEIGHTS)" if evaluation.random_weights else ""
    if t.reached:
        return t.value, (f"calibrated by retrieval_eval{weights}: precision {t.precision:.3f} "
                         f"(target {evaluation.target_precision}) and recall {t.recall:.3f} on edited copies")
    return t.value, (f"retrieval_eval{weights}: no threshold reaches precision {evaluation.target_precision} "
                     f"on edited copies; this one is above every non-copy (recall {t.recall:.3f})")


def choose_grouping(config: NearDuplicatesConfig, evaluation: ev.Evaluation) -> tuple[str, str]:
    """The grouping rule, and why."""
    if config.grouping != "auto":
        if config.grouping not in duplicates.RULES:
            raise ValueError(f"unknown grouping {config.grouping!r}; choose auto, {', '.join(duplicates.RULES)}")
        return config.grouping, "set in config"
    scores = ", ".join(f"{g.rule} {g.f1:.3f}" for g in evaluation.groupings)
    return evaluation.grouping, f"best B-cubed F1 on retrieval_eval's planted copies ({scores})"


def _distinct_embeddings(files: dict[str, pq.ParquetFile]):
    """``(ids, vectors)`` chunks over all batches, each image_id once."""
    return ix.distinct_chunks(tables.iter_embeddings([f for _, f in sorted(files.items())]))


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


@asset(
    ins={"faiss_index": AssetIn(), "image_embeddings": AssetIn(), "retrieval_eval": AssetIn()},
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
    retrieval_eval: ev.Evaluation,
    storage: StorageResource,
) -> pa.Table:
    """Groups of near-duplicate images: pairs of distinct images at least ``threshold`` similar
    (range search on faiss_index at its nprobe), grouped by the rule retrieval_eval measured
    best, at the threshold it calibrated (config overrides either). One row per pair inside a
    group: image_id_a < image_id_b, similarity, group (0 = largest), and the first path of each."""
    threshold, threshold_reason = choose_threshold(config, retrieval_eval)
    rule, rule_reason = choose_grouping(config, retrieval_eval)
    ivf = faiss_index.ivf
    a, b, sims = [], [], []
    for ids, vectors in _distinct_embeddings(indexed_embeddings(faiss_index, image_embeddings)):
        if not len(ids):
            continue
        lims, scores, found = ivf.range_search(faiss_index.to_index_space(vectors), threshold)
        query = np.repeat(ids, np.diff(lims.astype(np.int64)))
        keep = query < found  # each pair once, never an image with itself
        a.append(query[keep])
        b.append(found[keep])
        sims.append(scores[keep])
    a, b, sims = _concat(a, np.int64), _concat(b, np.int64), _concat(sims, np.float32)
    groups = duplicates.RULES[rule](a, b, sims)
    group_a = np.array([groups.get(i, -1) for i in a.tolist()], dtype=np.int64)
    group_b = np.array([groups.get(i, -2) for i in b.tolist()], dtype=np.int64)
    inside = group_a == group_b  # pairs across groups (or with an ungrouped image) are not kept
    pairs_found = len(a)
    a, b, sims, group = a[inside], b[inside], sims[inside], group_a[inside]
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
        "threshold": threshold,
        "threshold_reason": threshold_reason,
        "grouping": rule,
        "grouping_reason": rule_reason,
        "pairs_across_groups": pairs_found - table.num_rows,
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
