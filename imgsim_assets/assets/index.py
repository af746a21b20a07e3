"""Embeddings → PCA → centroids → per-batch IVF shards → the merged, searchable ``faiss_index``."""


import time
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    Config,
    MetadataValue,
    asset,
    asset_check,
    multi_asset_check,
)
from pydantic import Field

from imgsim_assets.core import build, plots
from imgsim_assets.core import index as ix
from imgsim_assets.core.build import CentroidSettings, IndexSettings, PcaSettings, TemplateSettings
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.core.vectors import EmbeddingFiles
from imgsim_assets.io_managers import StagedFile, save_npz
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import BATCH_RUNS, GPU_POOL, GPU_STEP_TAGS, TRAINED, TRANSIENT_RETRY
from imgsim_assets.resources import StorageResource


_PCA, _CENTROIDS, _TEMPLATE, _INDEX = PcaSettings(), CentroidSettings(), TemplateSettings(), IndexSettings()


class PcaConfig(Config):
    dim: int = Field(default=_PCA.dim, description="output dimension (capped by the data: at most N-1 and D)")
    variance: Optional[float] = Field(default=_PCA.variance, description="instead of dim: keep this fraction of variance")
    whiten: bool = _PCA.whiten
    max_samples: int = Field(default=_PCA.max_samples, description="fit on at most this many vectors, sampled "
                             "across batches")
    seed: int = _PCA.seed


class CentroidsConfig(Config):
    nlist: Optional[int] = Field(default=_CENTROIDS.nlist, description="number of clusters; default per_sqrt·√N")
    per_sqrt: float = Field(default=_CENTROIDS.per_sqrt, description="clusters per √N (4 to 16 is the useful range)")
    points_per_centroid: int = Field(default=_CENTROIDS.points_per_centroid,
                                     description="train on this many vectors per cluster (30 to 256)")
    niter: int = _CENTROIDS.niter
    seed: int = _CENTROIDS.seed


class TemplateConfig(Config):
    memory_budget_mb: int = Field(default=_TEMPLATE.memory_budget_mb, description="the index (codes, ids, "
                                  "centroids) must fit in this")
    exact_max: int = Field(default=_TEMPLATE.exact_max, description="up to this many vectors, search exactly (Flat)")
    codec: Optional[str] = Field(default=_TEMPLATE.codec, description="force Flat, SQ8 or PQ<m>; default: the best "
                                 "that fits")
    seed: int = _TEMPLATE.seed


class IndexConfig(Config):
    recall_target: float = Field(default=_INDEX.recall_target, description="nprobe is raised until recall@10 "
                                 "reaches this")
    nprobe: Optional[int] = Field(default=_INDEX.nprobe, description="use this nprobe instead of tuning it")
    max_pca_loss: float = Field(default=_INDEX.max_pca_loss, description="the pca_loss check warns when exact "
                                "search after PCA finds less than 1 - this of the raw embeddings' top 10")
    recall_queries: int = Field(default=_INDEX.recall_queries, description="held-out queries sampled from the "
                                "collection")
    recall_database: int = Field(default=_INDEX.recall_database, description="recall is measured within a fixed "
                                 "sample of about this many indexed vectors (exact truth costs queries × this); 0: all")
    drift_threshold: float = Field(default=_INDEX.drift_threshold, description="a batch whose PCA residual exceeds "
                                   "the training sample's by this factor asks for retraining")
    seed: int = _INDEX.seed


def _settings(cls, config: Config):
    """The core's settings from the Dagster config of the same fields."""
    return cls(**config.model_dump())


@asset(
    ins={"image_embeddings": AssetIn()},
    io_manager_key="npz_io_manager",
    group_name="index",
    kinds={"scikitlearn"},
    automation_condition=TRAINED,
)
def pca_model(
    context: AssetExecutionContext, config: PcaConfig, image_embeddings: dict[str, pq.ParquetFile]
) -> ix.PcaModel:
    """PCA fitted on a bounded sample of embeddings across all batches; stored as plain arrays.
    Retraining it makes every index shard stale."""
    if not image_embeddings:
        raise ValueError("no batch has image_embeddings yet: materialize some batches first")
    provenance = build.encoder_of(image_embeddings)
    start = time.perf_counter()
    model, samples = build.train_pca(EmbeddingFiles(image_embeddings), _settings(PcaSettings, config), provenance)
    context.add_output_metadata(
        {
            "input_dim": model.input_dim,
            "output_dim": model.output_dim,
            "num_samples": samples,
            "num_vectors": len(EmbeddingFiles(image_embeddings)),
            "explained_variance": float(model.explained_variance_ratio.sum()),
            "train_residual": model.train_residual,
            "whiten": model.whiten,
            "weights_fingerprint": str(provenance.get("weights_fingerprint", "")),
            "fit_seconds": round(time.perf_counter() - start, 3),
            "batches": len(image_embeddings),
            "explained_variance_plot": MetadataValue.md(
                plots.markdown_image(plots.explained_variance(model.spectrum, model.output_dim),
                                     "cumulative explained variance")
            ),
        }
    )
    return model


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn()},
    io_manager_key="npy_io_manager",
    group_name="index",
    kinds={"faiss"},
    automation_condition=TRAINED,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
)
def cluster_centroids(
    context: AssetExecutionContext,
    config: CentroidsConfig,
    image_embeddings: dict[str, pq.ParquetFile],
    pca_model: ix.PcaModel,
) -> np.ndarray:
    """Spherical k-means centroids (K×d) of PCA-reduced, L2-normalised embeddings (Faiss, on GPU
    when there is one). K ≈ 4·√N by default, trained on a sample of about 64·K vectors."""
    data = EmbeddingFiles(image_embeddings)
    start = time.perf_counter()
    trained = build.train_centroids(data, pca_model, _settings(CentroidSettings, config))
    for note in trained.notes:
        context.log.warning(note)
    centroids, sample, nlist = trained.centroids, trained.sample, len(trained.centroids)
    clusters, sims = ix.nearest_centroid(sample, centroids)
    sizes = np.bincount(clusters, minlength=nlist)
    context.add_output_metadata(
        {
            "nlist": nlist,
            "dim": int(centroids.shape[1]),
            "num_vectors": len(data),
            "num_training_samples": len(sample),
            "imbalance_factor": float((sizes**2).sum() * nlist / max(sizes.sum() ** 2, 1)),
            "mean_similarity_to_centroid": float(sims.mean()),
            "weights_fingerprint": str(pca_model.provenance.get("weights_fingerprint", "")),
            "gpu": faiss.get_num_gpus() > 0,
            "train_seconds": round(time.perf_counter() - start, 3),
            "fallbacks": MetadataValue.json(trained.notes),
            "cluster_sizes": MetadataValue.md(plots.markdown_image(plots.cluster_sizes(sizes), "cluster sizes")),
        }
    )
    return centroids


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn(), "cluster_centroids": AssetIn()},
    io_manager_key="faiss_io_manager",
    group_name="index",
    kinds={"faiss"},
    automation_condition=TRAINED,
)
def index_template(
    context: AssetExecutionContext,
    config: TemplateConfig,
    image_embeddings: dict[str, pq.ParquetFile],
    pca_model: ix.PcaModel,
    cluster_centroids: np.ndarray,
) -> faiss.Index:
    """The trained, empty Faiss index every shard is a copy of, sized to the collection: exact
    (Flat) for small ones, else IVF over cluster_centroids with Flat, SQ8 or PQ codes, the most
    precise that fits the memory budget. Factory string, memory and fallbacks are metadata."""
    data = EmbeddingFiles(image_embeddings)
    start = time.perf_counter()
    template, plan = build.train_template(data, pca_model, np.asarray(cluster_centroids),
                                          _settings(TemplateSettings, config))
    for note in plan.notes:
        context.log.warning(note)
    total = len(data)
    context.add_output_metadata(
        {
            "factory": plan.factory,
            "nlist": plan.nlist,
            "codec": plan.codec,
            "bytes_per_vector": plan.code_bytes + ix.ID_BYTES,
            "memory_bytes_estimate": plan.memory_bytes(total),
            "memory_budget_bytes": config.memory_budget_mb << 20,
            "num_vectors": total,
            "weights_fingerprint": str(pca_model.provenance.get("weights_fingerprint", "")),
            "fallbacks": MetadataValue.json(list(plan.notes)),
            "train_seconds": round(time.perf_counter() - start, 3),
        }
    )
    return template


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn(), "index_template": AssetIn()},
    partitions_def=image_batches,
    io_manager_key="npz_io_manager",
    group_name="index",
    kinds={"faiss"},
    automation_condition=AutomationCondition.eager(),
    retry_policy=TRANSIENT_RETRY,
    backfill_policy=BATCH_RUNS,
)
def faiss_index_shards(
    context: AssetExecutionContext,
    image_embeddings: dict[str, pq.ParquetFile],
    pca_model: ix.PcaModel,
    index_template: faiss.Index,
    storage: StorageResource,
) -> dict[str, StagedFile]:
    """The batch's vectors encoded with the current PCA and trained index: a shard whose ids are
    image_ids. Adding a batch builds only its shard; nothing is retrained. The shard carries the
    batch's drift: its PCA residual relative to the training sample's. A run over several
    batches holds one batch at a time."""
    shards = {}
    trained = ix.layout_fingerprint(index_template), ix.shard_centroids(index_template)  # once per run
    for batch in context.partition_keys:
        shard, metadata = _build_shard(batch, image_embeddings[batch].read(), pca_model, index_template, *trained)
        shards[batch] = StagedFile(storage.staging_path(".npz"))
        save_npz(shards[batch].path, shard)
        context.add_asset_metadata(metadata, partition_key=batch)
    return shards


def _build_shard(batch: str, embeddings: pa.Table, pca_model: ix.PcaModel, index_template: faiss.Index,
                 layout: str, centroids: np.ndarray) -> tuple[ix.Shard, dict]:
    """One batch's shard, and its metadata (``layout`` and ``centroids``: the template's)."""
    ids, vectors = build.batch_vectors(batch, embeddings, pca_model)
    reduced = pca_model.transform(vectors)  # once: for the shard and for its metadata
    shard = build.build_shard(index_template, pca_model, ids, vectors, layout, reduced)
    _, sims = ix.nearest_centroid(reduced, centroids) if len(vectors) else (None, np.zeros(1))
    return shard, {
        "num_vectors": len(shard),
        "dim": int(centroids.shape[1]),
        "nlist": int(centroids.shape[0]),
        "pca_residual": shard.pca_residual,
        "drift": shard.drift,
        "mean_similarity_to_centroid": float(sims.mean()),
    }


@asset(
    ins={
        "faiss_index_shards": AssetIn(),
        "pca_model": AssetIn(),
        "index_template": AssetIn(),
        "raw_images": AssetIn(),
        "image_embeddings": AssetIn(),
    },
    io_manager_key="image_index_io_manager",
    group_name="index",
    kinds={"faiss"},
    automation_condition=AutomationCondition.eager(),
    retry_policy=TRANSIENT_RETRY,
)
def faiss_index(
    context: AssetExecutionContext,
    config: IndexConfig,
    faiss_index_shards: dict[str, ix.ShardFile],
    pca_model: ix.PcaModel,
    index_template: faiss.Index,
    raw_images: dict[str, pq.ParquetFile],
    image_embeddings: dict[str, pq.ParquetFile],
) -> ImageIndex:
    """All shards merged into one index (ids = image_id, each image once) that takes raw
    embeddings as queries, with a catalog of every file path. nprobe is tuned on held-out
    queries (1, 2, 4, … until tie-aware recall@10 against exact search after PCA reaches the
    target); the curve and the PCA loss (exact search after PCA vs on raw embeddings) are metadata."""
    expected = set(context.asset_partition_keys_for_input("faiss_index_shards"))
    pending = sorted(expected - set(faiss_index_shards))
    if pending:
        context.log.warning(f"batches without a shard yet, not in this index: {pending}")
    start = time.perf_counter()
    batches = sorted(faiss_index_shards)
    merged, duplicates = build.merge(index_template, [(b, faiss_index_shards[b]) for b in batches])
    catalog = build.catalog(raw_images, ix.ivf_ids(merged))
    drift = {b: faiss_index_shards[b].drift for b in batches}
    settings = _settings(IndexSettings, config)
    embedded = EmbeddingFiles({b: f for b, f in image_embeddings.items() if b in faiss_index_shards})
    evaluation, chosen = build.tune(merged, pca_model, embedded, settings)
    info = build.info(pca_model, merged, batches, evaluation, chosen, settings, drift)
    factory = info["factory"]
    if chosen.recall_at_10 < config.recall_target:
        context.log.warning(f"recall@10 {chosen.recall_at_10:.3f} is below the target {config.recall_target}")
    index = build.publish(pca_model, merged, catalog, info)
    curve = evaluation.curve
    metadata = {
        "num_vectors": int(merged.ntotal),
        "recall_at_10": chosen.recall_at_10,
        "one_recall_at_1": chosen.one_recall_at_1,
        **evaluation.metadata(),
        "ms_per_query": round(chosen.ms_per_query, 4),
        "nprobe": chosen.nprobe,
        "nlist": int(merged.nlist),
        "factory": factory,
        "num_files": catalog.num_rows,
        "duplicates_skipped": duplicates,
        "batches": len(faiss_index_shards),
        "batches_pending": MetadataValue.json(pending),
        "memory_bytes": ix.memory_bytes(merged),
        "build_seconds": round(time.perf_counter() - start, 3),
        "random_weights": info["encoder"].get("weights_file") == "random",
        "weights_fingerprint": str(info["encoder"].get("weights_fingerprint", "")),
        "max_drift": max((d for d in drift.values() if np.isfinite(d)), default=0.0),
        "recall_curve": MetadataValue.md(
            f"PCA loss (exact search after PCA vs raw embeddings): recall@10 {evaluation.pca_recall_at_10:.4f}, "
            f"1-recall@1 {evaluation.pca_one_recall_at_1:.4f}\n\n"
            "| nprobe | recall@10 | 1-recall@1 | ms/query |\n|---|---|---|---|\n"
            + "\n".join(f"| {p.nprobe} | {p.recall_at_10:.4f} | {p.one_recall_at_1:.4f} | {p.ms_per_query:.4f} |" for p in curve)
        ),
    }
    if curve:
        metadata["recall_curve_plot"] = MetadataValue.md(plots.markdown_image(
            plots.recall_curve([p.nprobe for p in curve], [p.recall_at_10 for p in curve],
                               [p.ms_per_query for p in curve], config.recall_target,
                               pca_recall=evaluation.pca_recall_at_10), "recall/latency"))
    context.add_output_metadata(metadata)
    return index


@multi_asset_check(
    specs=[
        AssetCheckSpec("faiss_index_recall", asset="faiss_index", blocking=True,
                       additional_deps=["image_embeddings"],
                       description="Tie-aware recall@10 of the published index at its nprobe against exact "
                       "search after PCA (the ANN loss), on held-out queries other than the ones it was tuned "
                       "on. Below the target it fails and blocks downstream use."),
        AssetCheckSpec("pca_loss", asset="faiss_index", additional_deps=["image_embeddings"],
                       description="Tie-aware recall@10 of exact search after PCA against exact search on the "
                       "raw embeddings. Warns when the reduction loses more than max_pca_loss."),
    ],
    ins={"faiss_index": AssetIn(), "image_embeddings": AssetIn()},
)
def recall_checks(faiss_index: ImageIndex, image_embeddings: dict[str, pq.ParquetFile]):
    """Re-measures the published index, as the asset measured it (:func:`build.gate`), on
    queries it was not tuned on: the blocking ANN recall gate and the PCA loss warning, from
    one pass over the embeddings."""
    data = EmbeddingFiles(build.indexed_embeddings(faiss_index, image_embeddings))
    point, evaluation, settings = build.gate(faiss_index, data)
    target, max_loss = settings.recall_target, settings.max_pca_loss
    ivf = faiss_index.ivf
    figures = {"recall_at_10": point.recall_at_10, "one_recall_at_1": point.one_recall_at_1, "target": target,
               "nprobe": int(ivf.nprobe), "queries": evaluation.num_queries, "tie_epsilon": evaluation.epsilon}
    passed = point.recall_at_10 >= target
    yield AssetCheckResult(
        check_name="faiss_index_recall", passed=passed, severity=AssetCheckSeverity.ERROR, metadata=figures,
        description=None if passed else (f"recall@10 {point.recall_at_10:.3f} < target {target} at nprobe "
                                         f"{ivf.nprobe}: raise nprobe or rebuild"),
    )
    loss = 1.0 - evaluation.pca_recall_at_10
    yield AssetCheckResult(
        check_name="pca_loss", passed=loss <= max_loss, severity=AssetCheckSeverity.WARN,
        metadata={"pca_recall_at_10": evaluation.pca_recall_at_10, "pca_one_recall_at_1": evaluation.pca_one_recall_at_1,
                  "max_pca_loss": max_loss, "pca_dim": int(ivf.d)},
        description=None if loss <= max_loss else (
            f"PCA to {ivf.d} dimensions loses {loss:.1%} of recall@10 (more than {max_loss:.0%}): "
            "raise pca_model's dim or set its variance"),
    )


@asset_check(asset=faiss_index)
def retraining_due(faiss_index: ImageIndex) -> AssetCheckResult:
    """Warns when a batch's embeddings drift from what PCA and the centroids were trained on
    (PCA residual over the training sample's above the threshold): time to retrain."""
    threshold = IndexSettings.of(faiss_index.info).drift_threshold
    drift = {b: d for b, d in (faiss_index.info.get("drift") or {}).items() if d is not None and np.isfinite(d)}
    drifted = sorted(b for b, d in drift.items() if d > threshold)
    return AssetCheckResult(
        passed=not drifted,
        severity=AssetCheckSeverity.WARN,
        metadata={"max_drift": max(drift.values(), default=0.0), "threshold": threshold,
                  "drifted_batches": MetadataValue.json(drifted)},
        description=f"retrain: {len(drifted)} batch(es) drifted" if drifted else None,
    )
