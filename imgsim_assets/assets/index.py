"""Embeddings → PCA → centroids → per-batch IVF shards → the merged, searchable ``faiss_index``."""


import json
import time
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa
from dagster import AssetExecutionContext, AssetIn, Config, MetadataValue, asset
from pydantic import Field

from imgsim_assets.core import index as ix
from imgsim_assets.core import tables
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.partitions import image_batches


class PcaConfig(Config):
    dim: int = Field(default=256, description="output dimension (capped by the data: at most N-1 and D)")
    variance: Optional[float] = Field(default=None, description="instead of dim: keep this fraction of variance")
    whiten: bool = False
    max_samples: int = Field(default=100_000, description="fit on at most this many vectors, sampled across batches")
    seed: int = 0


class CentroidsConfig(Config):
    nlist: Optional[int] = Field(default=None, description="number of IVF lists; default about 4·√N")
    niter: int = 20
    seed: int = 0


class IndexConfig(Config):
    recall_target: float = Field(default=0.95, description="nprobe is raised until recall@10 reaches this")
    recall_queries: int = Field(default=1000, description="queries sampled from the collection to measure recall")


def _encoder_identity(provenance: dict) -> dict:
    """The parts of provenance that must agree for two vectors to be comparable."""
    keys = ("model", "weights_file", "pooling", "depth", "preprocess")
    return {k: provenance.get(k) for k in keys}


def _check_same_encoder(tables_by_batch: dict[str, pa.Table], expected: dict | None = None) -> dict:
    identities = {b: _encoder_identity(tables.provenance_of(t.schema)) for b, t in tables_by_batch.items()}
    reference = expected if expected is not None else next(iter(identities.values()), {})
    differing = {b: i for b, i in identities.items() if i != reference}
    if differing:
        raise ValueError(
            "image_embeddings were made with different encoders and cannot share one index. "
            f"Expected {json.dumps(reference, sort_keys=True)}; batches {sorted(differing)} differ, e.g. "
            f"{json.dumps(next(iter(differing.values())), sort_keys=True)}. Re-embed them with one encoder."
        )
    return reference


def _sample_embeddings(tables_by_batch: dict[str, pa.Table], cap: int, seed: int) -> np.ndarray:
    """Up to ``cap`` vectors, drawn across batches in proportion to their sizes."""
    total = sum(t.num_rows for t in tables_by_batch.values())
    if total == 0:
        raise ValueError("no embeddings to train on: every batch is empty or fully rejected")
    parts = []
    for i, (batch, table) in enumerate(sorted(tables_by_batch.items())):
        share = int(np.ceil(cap * table.num_rows / total))
        rows = ix.sample_indices(table.num_rows, share, seed + i)
        parts.append(tables.embedding_matrix(table)[rows])
    return np.concatenate(parts)[:cap]


@asset(
    ins={"image_embeddings": AssetIn()},
    io_manager_key="npz_io_manager",
    group_name="index",
    kinds={"scikitlearn"},
)
def pca_model(context: AssetExecutionContext, config: PcaConfig, image_embeddings: dict[str, pa.Table]) -> ix.PcaModel:
    """PCA fitted on a bounded sample of embeddings across all batches; stored as plain arrays.
    Retraining it makes every index shard stale."""
    provenance = tables.provenance_of(next(iter(image_embeddings.values())).schema) if image_embeddings else {}
    _check_same_encoder(image_embeddings)
    sample = _sample_embeddings(image_embeddings, config.max_samples, config.seed)
    start = time.perf_counter()
    model = ix.fit_pca(sample, dim=config.dim, variance=config.variance, whiten=config.whiten,
                       seed=config.seed, provenance=provenance)
    context.add_output_metadata(
        {
            "input_dim": model.input_dim,
            "output_dim": model.output_dim,
            "num_samples": len(sample),
            "explained_variance": float(model.explained_variance_ratio.sum()),
            "whiten": model.whiten,
            "fit_seconds": round(time.perf_counter() - start, 3),
            "batches": len(image_embeddings),
        }
    )
    return model


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn()},
    io_manager_key="npy_io_manager",
    group_name="index",
    kinds={"faiss"},
)
def cluster_centroids(
    context: AssetExecutionContext, config: CentroidsConfig, image_embeddings: dict[str, pa.Table], pca_model: ix.PcaModel
) -> np.ndarray:
    """Spherical k-means centroids (K×d) of PCA-reduced, L2-normalised embeddings: the IVF coarse
    quantizer every shard is encoded with. K ≈ 4·√N, trained on at most 256·K vectors."""
    total = sum(t.num_rows for t in image_embeddings.values())
    nlist = config.nlist or ix.choose_nlist(total)
    nlist = max(1, min(nlist, total))
    sample = pca_model.transform(_sample_embeddings(image_embeddings, ix.MAX_POINTS_PER_CENTROID * nlist, config.seed))
    start = time.perf_counter()
    centroids = ix.train_centroids(sample, nlist, seed=config.seed, niter=config.niter)
    sizes = np.bincount(faiss.knn(sample, centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel(), minlength=nlist)
    context.add_output_metadata(
        {
            "nlist": nlist,
            "dim": int(centroids.shape[1]),
            "num_vectors": total,
            "num_training_samples": len(sample),
            "imbalance_factor": float((sizes**2).sum() * nlist / max(sizes.sum() ** 2, 1)),
            "gpu": faiss.get_num_gpus() > 0,
            "train_seconds": round(time.perf_counter() - start, 3),
        }
    )
    return centroids


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn(), "cluster_centroids": AssetIn()},
    partitions_def=image_batches,
    io_manager_key="faiss_io_manager",
    group_name="index",
    kinds={"faiss"},
)
def faiss_index_shards(
    context: AssetExecutionContext, image_embeddings: pa.Table, pca_model: ix.PcaModel, cluster_centroids: np.ndarray
) -> faiss.Index:
    """The batch's vectors encoded with the current PCA and centroids: an IVF shard whose ids are
    image_ids. Adding a batch builds only its shard; nothing is retrained."""
    _check_same_encoder({context.partition_key: image_embeddings}, _encoder_identity(pca_model.provenance))
    vectors = tables.embedding_matrix(image_embeddings)
    if vectors.shape[1] != pca_model.input_dim:
        raise ValueError(
            f"batch {context.partition_key} has {vectors.shape[1]}-d embeddings but pca_model expects "
            f"{pca_model.input_dim}-d; retrain pca_model or re-embed the batch"
        )
    ids = image_embeddings.column("image_id").to_numpy()
    shard = ix.build_shard(cluster_centroids, ids, pca_model.transform(vectors))
    context.add_output_metadata({"num_vectors": int(shard.ntotal), "dim": int(shard.d), "nlist": int(shard.nlist)})
    return shard


@asset(
    ins={"faiss_index_shards": AssetIn(), "pca_model": AssetIn(), "cluster_centroids": AssetIn(), "raw_images": AssetIn()},
    io_manager_key="image_index_io_manager",
    group_name="index",
    kinds={"faiss"},
)
def faiss_index(
    context: AssetExecutionContext,
    config: IndexConfig,
    faiss_index_shards: dict[str, faiss.Index],
    pca_model: ix.PcaModel,
    cluster_centroids: np.ndarray,
    raw_images: dict[str, pa.Table],
) -> ImageIndex:
    """All shards merged into one index (ids = image_id, each image once) that takes raw
    embeddings as queries, with a catalog of every file path. Recall@10 against exact search is
    measured and nprobe set to reach the target."""
    expected = set(context.asset_partition_keys_for_input("faiss_index_shards"))
    pending = sorted(expected - set(faiss_index_shards))
    if pending:
        context.log.warning(f"batches without a shard yet, not in this index: {pending}")
    start = time.perf_counter()
    merged, duplicates = ix.merge_shards(cluster_centroids, sorted(faiss_index_shards.items()))
    curve = ix.recall_curve(merged, n_queries=config.recall_queries)
    chosen = ix.choose_nprobe(curve, config.recall_target) if curve else ix.RecallPoint(1, 1.0, 1.0, 0.0)
    merged.nprobe = chosen.nprobe
    index = ix.with_pretransform(pca_model, merged)
    catalog = _catalog(raw_images, ix.ivf_ids(merged))
    factory = f"PCA{pca_model.output_dim}{'W' if pca_model.whiten else ''},L2norm,IVF{merged.nlist},Flat"
    info = {
        "encoder": dict(pca_model.provenance),
        "factory": factory,
        "nlist": int(merged.nlist),
        "nprobe": chosen.nprobe,
        "num_vectors": int(merged.ntotal),
        "recall_at_10": chosen.recall_at_10,
        "batches": sorted(faiss_index_shards),
    }
    if chosen.recall_at_10 < config.recall_target:
        context.log.warning(f"recall@10 {chosen.recall_at_10:.3f} is below the target {config.recall_target}")
    context.add_output_metadata(
        {
            "num_vectors": int(merged.ntotal),
            "recall_at_10": chosen.recall_at_10,
            "one_recall_at_1": chosen.one_recall_at_1,
            "nprobe": chosen.nprobe,
            "nlist": int(merged.nlist),
            "factory": factory,
            "num_files": catalog.num_rows,
            "duplicates_skipped": duplicates,
            "batches": len(faiss_index_shards),
            "batches_pending": MetadataValue.json(pending),
            "memory_bytes": int(merged.ntotal) * merged.code_size + int(merged.nlist) * merged.d * 4,
            "build_seconds": round(time.perf_counter() - start, 3),
            "random_weights": info["encoder"].get("weights_file") == "random",
            "recall_curve": MetadataValue.md(
                "| nprobe | recall@10 | 1-recall@1 | ms/query |\n|---|---|---|---|\n"
                + "\n".join(f"| {p.nprobe} | {p.recall_at_10:.4f} | {p.one_recall_at_1:.4f} | {p.ms_per_query:.4f} |" for p in curve)
            ),
        }
    )
    return ImageIndex(index=index, catalog=catalog, info=info)


def _catalog(manifests: dict[str, pa.Table], indexed_ids: np.ndarray) -> pa.Table:
    """Every ok file whose image is in the index: image_id, batch, path."""
    ids, batches, paths = [], [], []
    indexed = set(indexed_ids.tolist())
    for batch, manifest in sorted(manifests.items()):
        for image_id, path, status in zip(*(manifest.column(c).to_pylist() for c in ("image_id", "path", "status"))):
            if status == "ok" and image_id in indexed:
                ids.append(image_id)
                batches.append(batch)
                paths.append(path)
    return pa.table({"image_id": pa.array(ids, pa.int64()), "batch": batches, "path": paths})
