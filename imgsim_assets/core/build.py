"""The index chain as plain functions, in the order the assets run them:

    train_pca → train_centroids → train_template → build_shard (per batch) → merge → tune → publish

Each step takes its settings (a frozen dataclass; every default of the chain is a field here,
and the assets' Dagster configs, the CLI and the benchmarks take them from here) and the
embeddings as a :class:`~imgsim_assets.core.vectors.Collection`: Parquet files per batch for
the assets, arrays for the benchmarks. The assets run one step each; :func:`run` runs them
all in one call over arrays in memory, as the benchmarks do, and :func:`add_batch` grows a
built index by one batch. The recall gate re-measures a published index with :func:`gate`,
the same measurement :func:`tune` made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgsim_assets.core import index as ix
from imgsim_assets.core import recall, tables
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.core.vectors import Arrays, Collection


@dataclass(frozen=True)
class PcaSettings:
    dim: int = 256  # output dimension (capped by the data: at most N-1 and D)
    variance: float | None = None  # instead of dim: keep this fraction of variance
    whiten: bool = False
    max_samples: int = 100_000  # fit on at most this many vectors, sampled across batches
    seed: int = 0


@dataclass(frozen=True)
class CentroidSettings:
    nlist: int | None = None  # number of clusters; default per_sqrt·√N
    per_sqrt: float = ix.LISTS_PER_SQRT  # clusters per √N (4 to 16 is the useful range)
    points_per_centroid: int = ix.TRAIN_POINTS_PER_CENTROID  # train on this many vectors per cluster (30 to 256)
    niter: int = ix.KMEANS_ITERATIONS
    seed: int = 0


@dataclass(frozen=True)
class TemplateSettings:
    memory_budget_mb: int = ix.MEMORY_BUDGET_MB  # the index (codes, ids, centroids) must fit in this
    exact_max: int = ix.EXACT_MAX  # up to this many vectors, search exactly (Flat)
    codec: str | None = None  # force Flat, SQ8 or PQ<m>; default: the most precise that fits
    seed: int = 0


@dataclass(frozen=True)
class IndexSettings:
    recall_target: float = 0.95  # nprobe is raised until tie-aware recall@10 reaches this
    nprobe: int | None = None  # use this nprobe instead of tuning it
    max_pca_loss: float = 0.05  # the pca_loss check warns above this loss of recall@10
    recall_queries: int = 1000  # held-out queries sampled from the collection
    recall_database: int = 100_000  # recall within a fixed sample of about this many vectors; 0: all
    drift_threshold: float = 1.25  # a batch whose PCA residual exceeds the training sample's by this asks for retraining
    seed: int = 0

    @classmethod
    def of(cls, info: Mapping) -> "IndexSettings":
        """The settings an index was measured with, read back from its ``info`` (:func:`info`
        writes them; an older index lacks some, which keep their defaults)."""
        stored = {"recall_target": "recall_target", "recall_queries": "recall_queries", "seed": "recall_seed",
                  "recall_database": "recall_database", "max_pca_loss": "max_pca_loss",
                  "drift_threshold": "drift_threshold"}
        return cls(**{name: info[key] for name, key in stored.items() if key in info})


def encoder_of(embeddings: Mapping[str, pq.ParquetFile | pa.Table], expected: Mapping | None = None) -> dict:
    """The encoder every batch's ``image_embeddings`` were made with (the provenance in their
    schema): ``expected`` (the PCA's), else the first batch's. Batches from another encoder
    cannot share one index, and raise."""
    from imgsim_assets.core.encoder import check_same_encoder  # torch is imported only when checking

    schemas = {b: f.schema_arrow if isinstance(f, pq.ParquetFile) else f.schema for b, f in embeddings.items()}
    provenances = {b: tables.provenance_of(schema) for b, schema in schemas.items()}
    return check_same_encoder(provenances, dict(expected) if expected is not None else None)


def batch_vectors(batch: str, embeddings: pa.Table, pca: ix.PcaModel) -> tuple[np.ndarray, np.ndarray]:
    """A batch's ``image_embeddings`` as (image_ids, vectors), once they are known to fit
    ``pca``: the same encoder, the same dimension."""
    encoder_of({batch: embeddings}, pca.provenance)
    vectors = tables.embedding_matrix(embeddings)
    if vectors.shape[1] != pca.input_dim:
        raise ValueError(
            f"batch {batch} has {vectors.shape[1]}-d embeddings but pca_model expects "
            f"{pca.input_dim}-d; retrain pca_model or re-embed the batch"
        )
    return embeddings.column("image_id").to_numpy(), vectors


def _reduce(pca: ix.PcaModel | None, raw: np.ndarray) -> np.ndarray:
    """Into the index's space (vectors already there when there is no PCA)."""
    return pca.transform(raw) if pca is not None else np.ascontiguousarray(raw, dtype=np.float32)


def train_pca(data: Collection, settings: PcaSettings = PcaSettings(),
              provenance: Mapping | None = None) -> tuple[ix.PcaModel, int]:
    """PCA fitted on a bounded sample of the collection, and the sample's size."""
    _, sample = data.sample(settings.max_samples, settings.seed)
    model = ix.fit_pca(sample, dim=settings.dim, variance=settings.variance, whiten=settings.whiten,
                       seed=settings.seed, provenance=dict(provenance or {}))
    return model, len(sample)


@dataclass
class Centroids:
    centroids: np.ndarray  # K×d, unit rows
    sample: np.ndarray  # the reduced vectors they were trained on
    notes: list[str]  # fallbacks taken (too few vectors for the clusters asked for)


def train_centroids(data: Collection, pca: ix.PcaModel | None,
                    settings: CentroidSettings = CentroidSettings()) -> Centroids:
    """Spherical k-means centroids of the reduced vectors (on a GPU when there is one): K ≈
    ``per_sqrt``·√N, trained on about ``points_per_centroid``·K of them."""
    nlist, notes = ix.feasible_nlist(len(data), settings.nlist, settings.per_sqrt)
    per_centroid = min(max(settings.points_per_centroid, 30), ix.MAX_POINTS_PER_CENTROID)
    _, raw = data.sample(per_centroid * nlist, settings.seed)
    sample = _reduce(pca, raw)
    centroids = ix.train_centroids(sample, nlist, seed=settings.seed, niter=settings.niter)
    return Centroids(centroids, sample, notes)


def train_template(data: Collection, pca: ix.PcaModel | None, centroids: np.ndarray,
                   settings: TemplateSettings = TemplateSettings()) -> tuple[faiss.IndexIVF, ix.IndexPlan]:
    """The trained, empty index every shard is a copy of, sized to the collection
    (:func:`index.plan_index`: exact up to ``exact_max`` vectors, else IVF over ``centroids``
    with the most precise code that fits the budget), and its plan."""
    _, raw = data.sample(ix.code_training_size(len(centroids)), settings.seed)
    plan = ix.plan_index(len(data), centroids.shape[1], memory_budget_bytes=settings.memory_budget_mb << 20,
                         exact_max=settings.exact_max, nlist=len(centroids), codec=settings.codec,
                         train_samples=len(raw))
    return ix.build_template(plan, _reduce(pca, raw), np.asarray(centroids), seed=settings.seed), plan


def build_shard(template: faiss.IndexIVF, pca: ix.PcaModel | None, ids: np.ndarray, embeddings: np.ndarray,
                layout: str | None = None, reduced: np.ndarray | None = None) -> ix.Shard:
    """One batch's vectors in the template's lists (with the batch's drift when there is a PCA);
    ``reduced``: their PCA transform, when the caller has it already."""
    if pca is None:
        return ix.build_shard(template, ids, embeddings, layout)
    return ix.Shard.build(template, pca, ids, embeddings, reduced, layout)


def merge(template: faiss.Index, shards: Iterable[tuple[str, ix.Shard | ix.ShardFile]]) -> tuple[faiss.IndexIVF, int]:
    """The shards in one index (each image once), and how many repeats were skipped."""
    return ix.merge_shards(faiss.downcast_index(template), shards)


def published(pca: ix.PcaModel | None, merged: faiss.Index) -> faiss.Index:
    """What is searched: raw embeddings in, the PCA as the index's own pre-transforms."""
    return ix.with_pretransform(pca, merged) if pca is not None else merged


def factory(pca: ix.PcaModel | None, merged: faiss.Index) -> str:
    """The published index's Faiss factory string."""
    inner = ix.factory_of(merged)
    return f"PCA{pca.output_dim}{'W' if pca.whiten else ''},L2norm,{inner}" if pca is not None else inner


def tune(merged: faiss.IndexIVF, pca: ix.PcaModel | None, data: Collection,
         settings: IndexSettings = IndexSettings()) -> tuple[recall.RecallCurve, recall.RecallPoint]:
    """nprobe tuned on queries drawn from the collection (1, 2, 4, … until tie-aware recall@10
    reaches the target; or ``settings.nprobe`` measured as set), set on ``merged``. Returns the
    curve and the point chosen."""
    curve = recall.measure(published(pca, merged), data, settings.recall_queries, settings.seed,
                           nprobes=[settings.nprobe] if settings.nprobe else None,
                           target=None if settings.nprobe else settings.recall_target,
                           max_database=settings.recall_database or None)
    chosen = curve.cheapest(settings.recall_target)
    merged.nprobe = chosen.nprobe
    return curve, chosen


def info(pca: ix.PcaModel, merged: faiss.IndexIVF, batches: list[str], curve: recall.RecallCurve,
         chosen: recall.RecallPoint, settings: IndexSettings, drift: Mapping[str, float]) -> dict:
    """How the index was built: what its users, its checks and the service read back."""
    return {
        "encoder": dict(pca.provenance),
        "factory": factory(pca, merged),
        "nlist": int(merged.nlist),
        "nprobe": chosen.nprobe,
        "num_vectors": int(merged.ntotal),
        "batches": batches,
        "recall_target": settings.recall_target,
        "recall_queries": settings.recall_queries,
        "recall_seed": settings.seed,
        "recall_database": settings.recall_database,
        "recall_at_10": chosen.recall_at_10,
        "one_recall_at_1": chosen.one_recall_at_1,
        "pca_recall_at_10": curve.pca_recall_at_10,
        "max_pca_loss": settings.max_pca_loss,
        "drift": dict(drift),
        "drift_threshold": settings.drift_threshold,
    }


def publish(pca: ix.PcaModel, merged: faiss.IndexIVF, catalog: pa.Table, built: dict) -> ImageIndex:
    """The searchable index: the merged lists behind the PCA, the catalog, how it was built."""
    return ImageIndex(index=published(pca, merged), catalog=catalog, info=built)


def indexed_embeddings(index: ImageIndex, files: Mapping[str, pq.ParquetFile]) -> dict[str, pq.ParquetFile]:
    """The ``image_embeddings`` files of the batches ``index`` was merged from."""
    batches = set(index.info.get("batches", []))
    return {b: f for b, f in files.items() if b in batches}


def gate(index: ImageIndex, data: Collection) -> tuple[recall.RecallPoint, recall.RecallCurve, IndexSettings]:
    """The published index measured again as :func:`tune` measured it, at its nprobe, on
    queries it was not tuned on (the next seed): the recall gate's figures."""
    settings = IndexSettings.of(index.info)
    curve = recall.measure(index.index, data, settings.recall_queries, seed=settings.seed + 1,
                           max_database=settings.recall_database or None)
    return curve.cheapest(settings.recall_target), curve, settings


def add_batch(template: faiss.IndexIVF, pca: ix.PcaModel | None, merged: faiss.IndexIVF, batch: str,
              ids: np.ndarray, embeddings: np.ndarray) -> faiss.IndexIVF:
    """``merged`` grown by one batch, as ``faiss_index`` grows when a batch arrives: the batch's
    shard merged after the index's own lists, nothing retrained, at the same nprobe."""
    shard = build_shard(template, pca, ids, embeddings)
    grown, _ = merge(template, [("index", ix.Shard.from_index(merged)), (batch, shard)])
    grown.nprobe = merged.nprobe
    return grown


@dataclass(frozen=True)
class ChainSettings:
    """Every step's settings, for :func:`run`."""

    pca: PcaSettings | None = PcaSettings()  # None: index the vectors as they are, without PCA
    centroids: CentroidSettings = CentroidSettings()
    template: TemplateSettings = TemplateSettings()
    index: IndexSettings = IndexSettings()


@dataclass
class Built:
    """What :func:`run` made: the trained parts (to add batches later), the merged index at its
    tuned nprobe, the recall curve, and the seconds each stage took."""

    settings: ChainSettings
    pca: ix.PcaModel | None
    template: faiss.IndexIVF
    plan: ix.IndexPlan
    merged: faiss.IndexIVF
    curve: recall.RecallCurve
    chosen: recall.RecallPoint
    seconds: dict[str, float] = field(default_factory=dict)  # train, add, merge, tune

    def add_batch(self, batch: str, ids: np.ndarray, embeddings: np.ndarray) -> faiss.IndexIVF:
        """The index grown by one batch (:func:`add_batch`)."""
        return add_batch(self.template, self.pca, self.merged, batch, ids, embeddings)

    def info(self, batches: list[str], drift: Mapping[str, float] | None = None) -> dict:
        """:func:`info` of the merged index (a PCA is needed: it names the encoder)."""
        return info(self.pca, self.merged, batches, self.curve, self.chosen, self.settings.index, drift or {})


def run(data: Arrays, settings: ChainSettings = ChainSettings(),
        batches: Sequence[tuple[str, np.ndarray | slice]] = (("all", slice(None)),),
        provenance: Mapping | None = None, log: Callable[[str], None] = lambda _: None) -> Built:
    """The whole chain over vectors in memory, step by step as the assets run it: train (PCA,
    centroids, template), one shard per batch (``batches``: a name and the batch's rows of
    ``data``; default one batch of everything), merge, tune. ``provenance`` names the encoder
    in the PCA; ``log`` hears about each stage as it ends (a large build takes minutes)."""
    seconds = {}
    start = time.perf_counter()
    pca = train_pca(data, settings.pca, provenance)[0] if settings.pca is not None else None
    trained = train_centroids(data, pca, settings.centroids)
    template, plan = train_template(data, pca, trained.centroids, settings.template)
    del trained
    seconds["train"] = time.perf_counter() - start
    log(f"trained {plan.factory} in {seconds['train']:.0f} s")

    start = time.perf_counter()
    shards = [(name, build_shard(template, pca, data.ids[rows], data.vectors[rows])) for name, rows in batches]
    seconds["add"] = time.perf_counter() - start
    start = time.perf_counter()
    merged, _ = merge(template, shards)
    del shards
    seconds["merge"] = time.perf_counter() - start
    log(f"added and merged {len(data):,} vectors in {seconds['add'] + seconds['merge']:.0f} s; tuning nprobe")

    start = time.perf_counter()
    curve, chosen = tune(merged, pca, data, settings.index)
    seconds["tune"] = time.perf_counter() - start
    log(f"nprobe {chosen.nprobe} (recall@10 {chosen.recall_at_10:.4f}) in {seconds['tune']:.0f} s")
    return Built(settings, pca, template, plan, merged, curve, chosen, seconds)


def catalog(manifests: Mapping[str, pq.ParquetFile | pa.Table], indexed_ids: np.ndarray) -> pa.Table:
    """Every ok file whose image is in the index: image_id, batch, path and the photo metadata
    (:data:`tables.PHOTO_COLUMNS`; null where a manifest predates them). Manifests are read one
    at a time, those columns only; membership is tested once over all of them, since each test
    hashes the whole index's ids."""
    columns = ["image_id", "path", *tables.PHOTO_COLUMNS]
    parts = []
    for batch, manifest in sorted(manifests.items()):
        rows = tables.manifest_columns(manifest, [*columns, "status"])
        rows = rows.filter(pc.equal(rows["status"], "ok"))
        parts.append(pa.table({"image_id": rows["image_id"], "batch": pa.array([batch] * rows.num_rows, pa.string()),
                               **{c: rows[c] for c in columns[1:]}}))
    if not parts:
        return catalog_schema().empty_table()
    table = pa.concat_tables(parts)
    indexed = pa.array(np.unique(indexed_ids), pa.int64())
    return table.filter(pc.is_in(table["image_id"], value_set=indexed)).combine_chunks()


def catalog_schema() -> pa.Schema:
    """The catalog's columns: one row per indexed file."""
    photo = [tables.MANIFEST_SCHEMA.field(c) for c in tables.PHOTO_COLUMNS]
    return pa.schema([("image_id", pa.int64()), ("batch", pa.string()), ("path", pa.string()), *photo])
