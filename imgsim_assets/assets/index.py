"""Embeddings → PCA → centroids → per-batch IVF shards → the merged, searchable ``faiss_index``."""


import json
import time
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetRecordsFilter,
    AutomationCondition,
    Config,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from imgsim_assets.core import index as ix
from imgsim_assets.core import plots, tables
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import GPU_POOL, TRAINED, TRANSIENT_RETRY


class PcaConfig(Config):
    dim: int = Field(default=256, description="output dimension (capped by the data: at most N-1 and D)")
    variance: Optional[float] = Field(default=None, description="instead of dim: keep this fraction of variance")
    whiten: bool = False
    max_samples: int = Field(default=100_000, description="fit on at most this many vectors, sampled across batches")
    seed: int = 0


class CentroidsConfig(Config):
    nlist: Optional[int] = Field(default=None, description="number of clusters; default per_sqrt·√N")
    per_sqrt: float = Field(default=4.0, description="clusters per √N (4 to 16 is the useful range)")
    points_per_centroid: int = Field(default=ix.TRAIN_POINTS_PER_CENTROID,
                                     description="train on this many vectors per cluster (30 to 256)")
    niter: int = ix.KMEANS_ITERATIONS
    seed: int = 0


class TemplateConfig(Config):
    memory_budget_mb: int = Field(default=4096, description="the index (codes, ids, centroids) must fit in this")
    exact_max: int = Field(default=20_000, description="up to this many vectors, search exactly (Flat)")
    codec: Optional[str] = Field(default=None, description="force Flat, SQ8 or PQ<m>; default: the best that fits")
    seed: int = 0


class IndexConfig(Config):
    recall_target: float = Field(default=0.95, description="nprobe is raised until recall@10 reaches this")
    recall_queries: int = Field(default=1000, description="held-out queries sampled from the collection")
    drift_threshold: float = Field(default=1.25, description="a batch whose PCA residual exceeds the training "
                                   "sample's by this factor asks for retraining")
    seed: int = 0


def _encoder_identity(provenance: dict) -> dict:
    """The parts of provenance that must agree for two vectors to be comparable."""
    keys = ("model", "weights_file", "pooling", "depth", "preprocess")
    return {k: provenance.get(k) for k in keys}


def _check_same_encoder(schemas: dict[str, pa.Schema], expected: dict | None = None) -> dict:
    identities = {b: _encoder_identity(tables.provenance_of(schema)) for b, schema in schemas.items()}
    reference = expected if expected is not None else next(iter(identities.values()), {})
    differing = {b: i for b, i in identities.items() if i != reference}
    if differing:
        raise ValueError(
            "image_embeddings were made with different encoders and cannot share one index. "
            f"Expected {json.dumps(reference, sort_keys=True)}; batches {sorted(differing)} differ, e.g. "
            f"{json.dumps(next(iter(differing.values())), sort_keys=True)}. Re-embed them with one encoder."
        )
    return reference


def _schemas(files: dict[str, pq.ParquetFile]) -> dict[str, pa.Schema]:
    return {b: f.schema_arrow for b, f in files.items()}


def _total(files: dict[str, pq.ParquetFile]) -> int:
    return sum(f.metadata.num_rows for f in files.values())


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
    provenance = tables.provenance_of(next(iter(image_embeddings.values())).schema_arrow)
    _check_same_encoder(_schemas(image_embeddings))
    _, sample = tables.sample_embeddings(image_embeddings, config.max_samples, config.seed)
    start = time.perf_counter()
    model = ix.fit_pca(sample, dim=config.dim, variance=config.variance, whiten=config.whiten,
                       seed=config.seed, provenance=provenance)
    context.add_output_metadata(
        {
            "input_dim": model.input_dim,
            "output_dim": model.output_dim,
            "num_samples": len(sample),
            "num_vectors": _total(image_embeddings),
            "explained_variance": float(model.explained_variance_ratio.sum()),
            "train_residual": model.train_residual,
            "whiten": model.whiten,
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
)
def cluster_centroids(
    context: AssetExecutionContext,
    config: CentroidsConfig,
    image_embeddings: dict[str, pq.ParquetFile],
    pca_model: ix.PcaModel,
) -> np.ndarray:
    """Spherical k-means centroids (K×d) of PCA-reduced, L2-normalised embeddings (Faiss, on GPU
    when there is one). K ≈ 4·√N by default, trained on a sample of about 64·K vectors."""
    total = _total(image_embeddings)
    nlist, fallbacks = config.nlist or ix.choose_nlist(total, config.per_sqrt), []
    if nlist > max(1, total // ix.MIN_POINTS_PER_CENTROID):
        fallback = ix.choose_nlist(total, config.per_sqrt)
        fallbacks.append(f"{nlist} clusters need {nlist * ix.MIN_POINTS_PER_CENTROID} vectors, have {total}: using {fallback}")
        context.log.warning(fallbacks[-1])
        nlist = fallback
    per_centroid = min(max(config.points_per_centroid, 30), ix.MAX_POINTS_PER_CENTROID)
    _, raw = tables.sample_embeddings(image_embeddings, per_centroid * nlist, config.seed)
    sample = pca_model.transform(raw)
    start = time.perf_counter()
    centroids = ix.train_centroids(sample, nlist, seed=config.seed, niter=config.niter)
    clusters, sims = ix.nearest_centroid(sample, centroids)
    sizes = np.bincount(clusters, minlength=nlist)
    context.add_output_metadata(
        {
            "nlist": nlist,
            "dim": int(centroids.shape[1]),
            "num_vectors": total,
            "num_training_samples": len(sample),
            "imbalance_factor": float((sizes**2).sum() * nlist / max(sizes.sum() ** 2, 1)),
            "mean_similarity_to_centroid": float(sims.mean()),
            "gpu": faiss.get_num_gpus() > 0,
            "train_seconds": round(time.perf_counter() - start, 3),
            "fallbacks": MetadataValue.json(fallbacks),
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
    total = _total(image_embeddings)
    exact = total <= config.exact_max
    _, raw = tables.sample_embeddings(image_embeddings, ix.MAX_POINTS_PER_CENTROID * max(len(cluster_centroids), 256),
                                      config.seed)
    plan = ix.plan_index(
        total, pca_model.output_dim, memory_budget_bytes=config.memory_budget_mb << 20, exact_max=config.exact_max,
        nlist=1 if exact else len(cluster_centroids), codec=config.codec, train_samples=len(raw),
    )
    for note in plan.notes:
        context.log.warning(note)
    sample = pca_model.transform(raw)
    centroids = ix.normalize_rows(sample.mean(axis=0, keepdims=True)) if plan.nlist == 1 else cluster_centroids
    if plan.nlist not in (1, len(cluster_centroids)):
        centroids = ix.train_centroids(sample, plan.nlist, seed=config.seed)
    start = time.perf_counter()
    template = ix.train_template(centroids, plan.codec, sample)
    context.add_output_metadata(
        {
            "factory": plan.factory,
            "nlist": plan.nlist,
            "codec": plan.codec,
            "bytes_per_vector": plan.code_bytes + ix.ID_BYTES,
            "memory_bytes_estimate": plan.memory_bytes(total),
            "memory_budget_bytes": config.memory_budget_mb << 20,
            "num_vectors": total,
            "fallbacks": MetadataValue.json(list(plan.notes)),
            "train_seconds": round(time.perf_counter() - start, 3),
        }
    )
    return template


@asset(
    ins={"image_embeddings": AssetIn(), "pca_model": AssetIn(), "index_template": AssetIn()},
    partitions_def=image_batches,
    io_manager_key="faiss_io_manager",
    group_name="index",
    kinds={"faiss"},
    automation_condition=AutomationCondition.eager(),
    retry_policy=TRANSIENT_RETRY,
)
def faiss_index_shards(
    context: AssetExecutionContext, image_embeddings: pa.Table, pca_model: ix.PcaModel, index_template: faiss.Index
) -> faiss.Index:
    """The batch's vectors encoded with the current PCA and trained index: a shard whose ids are
    image_ids. Adding a batch builds only its shard; nothing is retrained. Records the batch's
    drift: its PCA residual relative to the training sample's."""
    _check_same_encoder({context.partition_key: image_embeddings.schema}, _encoder_identity(pca_model.provenance))
    vectors = tables.embedding_matrix(image_embeddings)
    if vectors.shape[1] != pca_model.input_dim:
        raise ValueError(
            f"batch {context.partition_key} has {vectors.shape[1]}-d embeddings but pca_model expects "
            f"{pca_model.input_dim}-d; retrain pca_model or re-embed the batch"
        )
    ids = image_embeddings.column("image_id").to_numpy()
    reduced = pca_model.transform(vectors)
    shard = ix.build_shard(index_template, ids, reduced)
    residual = float(pca_model.residual_fraction(vectors).mean()) if len(vectors) else float("nan")
    drift = residual / pca_model.train_residual if pca_model.train_residual > 0 else float("nan")
    ivf = faiss.extract_index_ivf(shard)
    _, sims = ix.nearest_centroid(reduced, ix.shard_centroids(ivf)) if len(reduced) else (None, np.zeros(1))
    context.add_output_metadata(
        {
            "num_vectors": int(shard.ntotal),
            "dim": int(shard.d),
            "nlist": int(ivf.nlist),
            "pca_residual": residual,
            "drift": drift,
            "mean_similarity_to_centroid": float(sims.mean()),
        }
    )
    return shard


def _latest_metadata(context: AssetExecutionContext, asset: str, partition: str | None) -> dict:
    event = context.instance.get_latest_materialization_event(AssetKey(asset)) if partition is None else None
    if partition is not None:
        records = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1
        ).records
        event = records[0].event_log_entry if records else None
    materialization = event.asset_materialization if event else None
    return {k: v.value for k, v in materialization.metadata.items()} if materialization else {}


def indexed_embeddings(index: ImageIndex, files: dict[str, pq.ParquetFile]) -> dict[str, pq.ParquetFile]:
    """The ``image_embeddings`` files of the batches ``index`` was merged from."""
    batches = set(index.info.get("batches", []))
    return {b: f for b, f in files.items() if b in batches}


def held_out_recall(ivf: faiss.IndexIVF, transform, image_embeddings: dict[str, pq.ParquetFile],
                    n_queries: int, seed: int):
    """Queries sampled from the indexed embeddings (each searched with itself left out) and
    their exact top-10 in the same collection: ``(queries, query_ids, truth)``."""
    indexed = ix.ivf_ids(ivf)
    query_ids, raw = tables.sample_embeddings(image_embeddings, n_queries, seed)
    keep = np.isin(query_ids, indexed)
    query_ids, queries = query_ids[keep], transform(raw[keep])
    files = [f for _, f in sorted(image_embeddings.items())]
    database = ((ids, transform(x)) for ids, x in tables.iter_embeddings(files))
    return queries, query_ids, ix.exact_neighbours(queries, query_ids, database, k=10)


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
    faiss_index_shards: dict[str, faiss.Index],
    pca_model: ix.PcaModel,
    index_template: faiss.Index,
    raw_images: dict[str, pa.Table],
    image_embeddings: dict[str, pq.ParquetFile],
) -> ImageIndex:
    """All shards merged into one index (ids = image_id, each image once) that takes raw
    embeddings as queries, with a catalog of every file path. nprobe is tuned on held-out
    queries until recall@10 against exact search reaches the target; the curve is plotted."""
    expected = set(context.asset_partition_keys_for_input("faiss_index_shards"))
    pending = sorted(expected - set(faiss_index_shards))
    if pending:
        context.log.warning(f"batches without a shard yet, not in this index: {pending}")
    start = time.perf_counter()
    merged, duplicates = ix.merge_shards(faiss.downcast_index(index_template), sorted(faiss_index_shards.items()))
    catalog = _catalog(raw_images, ix.ivf_ids(merged))
    drift = {b: _latest_metadata(context, "faiss_index_shards", b).get("drift") for b in sorted(faiss_index_shards)}
    plan_factory = "Flat" if merged.nlist == 1 and isinstance(merged, faiss.IndexIVFFlat) else (
        f"IVF{merged.nlist},{_codec_name(merged)}")
    factory = f"PCA{pca_model.output_dim}{'W' if pca_model.whiten else ''},L2norm,{plan_factory}"
    info = {
        "encoder": dict(pca_model.provenance),
        "factory": factory,
        "nlist": int(merged.nlist),
        "num_vectors": int(merged.ntotal),
        "batches": sorted(faiss_index_shards),
        "recall_target": config.recall_target,
        "drift": drift,
        "drift_threshold": config.drift_threshold,
    }
    index = ImageIndex(index=ix.with_pretransform(pca_model, merged), catalog=catalog, info=info)
    embedded = {b: f for b, f in image_embeddings.items() if b in faiss_index_shards}
    queries, query_ids, truth = held_out_recall(merged, pca_model.transform, embedded, config.recall_queries, config.seed)
    curve = ix.recall_curve(merged, queries, query_ids, truth)
    chosen = ix.choose_nprobe(curve, config.recall_target) if curve else ix.RecallPoint(1, 1.0, 1.0, 0.0)
    merged.nprobe = chosen.nprobe
    info.update(nprobe=chosen.nprobe, recall_at_10=chosen.recall_at_10, one_recall_at_1=chosen.one_recall_at_1)
    if chosen.recall_at_10 < config.recall_target:
        context.log.warning(f"recall@10 {chosen.recall_at_10:.3f} is below the target {config.recall_target}")
    metadata = {
        "num_vectors": int(merged.ntotal),
        "recall_at_10": chosen.recall_at_10,
        "one_recall_at_1": chosen.one_recall_at_1,
        "ms_per_query": round(chosen.ms_per_query, 4),
        "nprobe": chosen.nprobe,
        "nlist": int(merged.nlist),
        "factory": factory,
        "num_files": catalog.num_rows,
        "duplicates_skipped": duplicates,
        "batches": len(faiss_index_shards),
        "batches_pending": MetadataValue.json(pending),
        "memory_bytes": int(merged.ntotal) * (merged.code_size + ix.ID_BYTES) + int(merged.nlist) * merged.d * 4,
        "build_seconds": round(time.perf_counter() - start, 3),
        "random_weights": info["encoder"].get("weights_file") == "random",
        "max_drift": max((d for d in drift.values() if d is not None and np.isfinite(d)), default=0.0),
        "recall_curve": MetadataValue.md(
            "| nprobe | recall@10 | 1-recall@1 | ms/query |\n|---|---|---|---|\n"
            + "\n".join(f"| {p.nprobe} | {p.recall_at_10:.4f} | {p.one_recall_at_1:.4f} | {p.ms_per_query:.4f} |" for p in curve)
        ),
    }
    if curve:
        metadata["recall_curve_plot"] = MetadataValue.md(plots.markdown_image(
            plots.recall_curve([p.nprobe for p in curve], [p.recall_at_10 for p in curve],
                               [p.ms_per_query for p in curve], config.recall_target), "recall/latency"))
    context.add_output_metadata(metadata)
    return index


def _codec_name(ivf: faiss.IndexIVF) -> str:
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return "SQ8"
    if isinstance(ivf, faiss.IndexIVFPQ):
        return f"PQ{ivf.pq.M}"
    return "Flat"


@asset_check(asset=faiss_index, additional_ins={"image_embeddings": AssetIn()}, blocking=True)
def faiss_index_recall(faiss_index: ImageIndex, image_embeddings: dict[str, pq.ParquetFile]) -> AssetCheckResult:
    """recall@10 of the published index at its nprobe, on held-out queries other than the ones
    it was tuned on, against exact search. Below the target it fails and blocks downstream use."""
    target = float(faiss_index.info.get("recall_target", 0.95))
    embedded = indexed_embeddings(faiss_index, image_embeddings)
    ivf = faiss_index.ivf
    queries, query_ids, truth = held_out_recall(ivf, faiss_index.to_index_space, embedded, 1000, seed=1)
    found = ix.search_excluding_self(ivf, queries, query_ids, 10)
    recall = ix.recall_at_k(found, truth, 10)
    one = float(np.mean((found[:, 0] == truth[:, 0]) | (truth[:, 0] < 0))) if len(found) else 1.0
    return AssetCheckResult(
        passed=recall >= target,
        severity=AssetCheckSeverity.ERROR,
        metadata={"recall_at_10": recall, "one_recall_at_1": one, "target": target, "nprobe": int(ivf.nprobe),
                  "queries": len(queries)},
        description=None if recall >= target else f"recall@10 {recall:.3f} < target {target}: raise nprobe or rebuild",
    )


@asset_check(asset=faiss_index)
def retraining_due(faiss_index: ImageIndex) -> AssetCheckResult:
    """Warns when a batch's embeddings drift from what PCA and the centroids were trained on
    (PCA residual over the training sample's above the threshold): time to retrain."""
    threshold = float(faiss_index.info.get("drift_threshold", 1.25))
    drift = {b: d for b, d in (faiss_index.info.get("drift") or {}).items() if d is not None and np.isfinite(d)}
    drifted = sorted(b for b, d in drift.items() if d > threshold)
    return AssetCheckResult(
        passed=not drifted,
        severity=AssetCheckSeverity.WARN,
        metadata={"max_drift": max(drift.values(), default=0.0), "threshold": threshold,
                  "drifted_batches": MetadataValue.json(drifted)},
        description=f"retrain: {len(drifted)} batch(es) drifted" if drifted else None,
    )


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
