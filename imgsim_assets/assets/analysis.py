"""What the index says about the collection: near-duplicate groups and cluster membership."""

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, AutomationCondition, Config, MetadataValue, asset
from pydantic import Field

from imgsim_assets.core import duplicates, incremental, plots, review, tables
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core import index as ix
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.core.storage import artifact_path
from imgsim_assets.resources import StorageResource


class NearDuplicatesConfig(Config):
    threshold: Optional[float] = Field(default=None, description="cosine similarity (in the index's space) at or "
                                       "above which two images are near-duplicates; default: the one retrieval_eval "
                                       "calibrated")
    grouping: str = Field(default="auto", description="representative (every member is paired with its group's "
                          "representative), connected (connected components) or auto (the one retrieval_eval "
                          "measured best)")
    groups_shown: int = Field(default=4, description="groups drawn as thumbnails in the metadata")
    incremental: bool = Field(default=True, description="search only batches the last materialization did not, "
                              "when its threshold and trained index are the current ones")


def choose_threshold(config: NearDuplicatesConfig, evaluation: ev.CopyDetectionReport) -> tuple[float, str]:
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


def choose_grouping(config: NearDuplicatesConfig, evaluation: ev.CopyDetectionReport) -> tuple[str, str]:
    """The grouping rule, and why."""
    if config.grouping != "auto":
        if config.grouping not in duplicates.RULES:
            raise ValueError(f"unknown grouping {config.grouping!r}; choose auto, {', '.join(duplicates.RULES)}")
        return config.grouping, "set in config"
    scores = ", ".join(f"{g.rule} {g.f1:.3f}" for g in evaluation.groupings)
    return evaluation.grouping, f"best B-cubed F1 on retrieval_eval's planted copies ({scores})"


class ImageClustersConfig(Config):
    incremental: bool = Field(default=True, description="assign only batches the last materialization did not, "
                              "when its PCA and centroids are the current ones and no batch was removed")


def _distinct_embeddings(files: dict[str, pq.ParquetFile], seen: set[int] | None = None):
    """``(ids, vectors)`` chunks over all batches, each image_id once (none of ``seen``)."""
    return ix.distinct_chunks(tables.iter_embeddings([f for _, f in sorted(files.items())]), seen)


@asset(
    ins={"faiss_index": AssetIn(), "retrieval_eval": AssetIn()},
    io_manager_key="parquet_io_manager",
    group_name="downstream",
    kinds={"faiss", "parquet"},
    automation_condition=AutomationCondition.eager(),
)
def near_duplicates(
    context: AssetExecutionContext,
    config: NearDuplicatesConfig,
    faiss_index: ImageIndex,
    retrieval_eval: ev.CopyDetectionReport,
    storage: StorageResource,
) -> pa.Table:
    """Groups of near-duplicate images: pairs of distinct images at least ``threshold`` similar
    (range search on faiss_index at its nprobe), grouped by the rule retrieval_eval measured
    best, at the threshold it calibrated (config overrides either). One row per pair:
    image_id_a < image_id_b, similarity, group (0 = largest; -1 for a pair whose images the rule
    put apart), and the first path of each. Only batches new or changed since the last search are
    searched, while the threshold and the trained index stay the same (``incremental``); pairs of
    images no longer indexed are dropped."""
    threshold, threshold_reason = choose_threshold(config, retrieval_eval)
    rule, rule_reason = choose_grouping(config, retrieval_eval)
    state = {"threshold": float(threshold), "layout": ix.layout_fingerprint(faiss_index.ivf),
             "nprobe": int(faiss_index.ivf.nprobe), "factory": faiss_index.info.get("factory")}
    versions = faiss_index.batch_fingerprints()  # a batch whose images changed is searched again
    previous = incremental.previous(artifact_path(storage.assets_dir, "near_duplicates", suffix=".parquet"), state)
    if previous is not None and config.incremental:
        before, covered = previous
        a, b, sims = (before.column(c).to_numpy() for c in ("image_id_a", "image_id_b", "similarity"))
        searched = {batch for batch, version in covered.items() if versions.get(batch) == version}
    else:
        a, b, sims, searched = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), set()
    todo = set(versions) - searched
    found = duplicates.range_pairs(faiss_index, todo, threshold)
    a, b, sims = duplicates.distinct_pairs(np.concatenate((a, found[0])), np.concatenate((b, found[1])),
                                 np.concatenate((sims, found[2])), np.unique(faiss_index.catalog.column("image_id").to_numpy()))
    # Pairs a person said are not duplicates are never grouped again.
    apart = review.separated_mask(a, b, *review.Decisions(storage.decisions_url(context.instance)).separated())
    a, b, sims = a[~apart], b[~apart], sims[~apart]
    groups = duplicates.RULES[rule](a, b, sims)
    group_a = np.array([groups.get(i, -1) for i in a.tolist()], dtype=np.int64)
    group_b = np.array([groups.get(i, -2) for i in b.tolist()], dtype=np.int64)
    group = np.where(group_a == group_b, group_a, -1)  # -1: a pair across groups, or with an ungrouped image
    describe = faiss_index.describe
    table = pa.table(
        {
            "image_id_a": pa.array(a, pa.int64()),
            "image_id_b": pa.array(b, pa.int64()),
            "similarity": pa.array(sims, pa.float32()),
            "group": pa.array(group, pa.int64()),
            "path_a": pa.array([describe(int(i))[0] for i in a], pa.string()),
            "path_b": pa.array([describe(int(i))[0] for i in b], pa.string()),
        }
    ).sort_by([("group", "ascending"), ("similarity", "descending"), ("image_id_a", "ascending"),
               ("image_id_b", "ascending")])
    table = incremental.with_state(table, state, versions)
    table = table.replace_schema_metadata({**table.schema.metadata, review.GROUPING_KEY: rule.encode()})
    members: dict[int, list[int]] = {}
    for image_id, g in sorted(groups.items(), key=lambda kv: kv[1]):
        members.setdefault(g, []).append(image_id)
    shown = [[plots.source_file(storage.images_dir, describe(i)[0]) for i in members[g][:6]]
             for g in sorted(members)[: config.groups_shown]]
    metadata = {
        "num_pairs": int((group >= 0).sum()),
        "num_groups": len(members),
        "images_in_groups": len(groups),
        "largest_group": max((len(m) for m in members.values()), default=0),
        "threshold": threshold,
        "threshold_reason": threshold_reason,
        "grouping": rule,
        "grouping_reason": rule_reason,
        "pairs_across_groups": int((group < 0).sum()),
        "pairs_not_duplicates": int(apart.sum()),
        "batches_searched": len(todo),
        "batches_reused": len(searched),
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
    config: ImageClustersConfig,
    image_embeddings: dict[str, pq.ParquetFile],
    pca_model: ix.PcaModel,
    cluster_centroids: np.ndarray,
    storage: StorageResource,
) -> pa.Table:
    """The k-means cluster of every distinct image (image_id, cluster, similarity to its
    centroid), from the same PCA and centroids as the index. Only new batches are read, while the
    PCA and centroids stay the same and no batch was removed or changed (``incremental``)."""
    state = {"model": incremental.fingerprint(pca_model.mean, pca_model.components, cluster_centroids)}
    versions = {b: incremental.file_version(artifact_path(storage.assets_dir, "image_embeddings", b, ".parquet"))
                for b in image_embeddings}
    previous = incremental.previous(artifact_path(storage.assets_dir, "image_clusters", suffix=".parquet"), state)
    ids, clusters, sims, done = [], [], [], set()
    # Rows carry no batch: reused only while every batch they came from is there, unchanged.
    if previous is not None and config.incremental and all(versions.get(b) == v for b, v in previous[1].items()):
        before, done = previous[0], set(previous[1])
        ids, clusters, sims = ([before.column(c).to_numpy()] for c in ("image_id", "cluster", "similarity"))
    todo = {b: f for b, f in image_embeddings.items() if b not in done}
    for chunk_ids, vectors in _distinct_embeddings(todo, seen=set(ids[0].tolist()) if ids else None):
        if not len(chunk_ids):
            continue
        c, s = ix.nearest_centroid(pca_model.transform(vectors), cluster_centroids)
        ids.append(chunk_ids)
        clusters.append(c)
        sims.append(s)
    ids, clusters, sims = ix.concat(ids, np.int64), ix.concat(clusters, np.int64), ix.concat(sims, np.float32)
    sizes = np.bincount(clusters, minlength=len(cluster_centroids))
    context.add_output_metadata(
        {
            "num_images": len(ids),
            "num_clusters": len(cluster_centroids),
            "largest_cluster": int(sizes.max()) if len(sizes) else 0,
            "empty_clusters": int((sizes == 0).sum()),
            "batches_assigned": len(todo),
            "batches_reused": len(done),
            "cluster_sizes": MetadataValue.md(plots.markdown_image(plots.cluster_sizes(sizes), "cluster sizes")),
        }
    )
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "cluster": pa.array(clusters, pa.int32()),
                      "similarity": pa.array(sims, pa.float32())}).sort_by("image_id")
    return incremental.with_state(table, state, versions)
