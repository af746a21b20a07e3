"""PCA, k-means centroids, IVF shards, merging, search and measured recall.

Vectors flow as: embedding (D) → PCA (d) → L2-normalise → IVF over the trained centroids,
compared by inner product. Shards are IVF indexes over the same centroids, one per batch;
the searchable index merges them and carries the PCA as a Faiss pre-transform, so it
takes raw embeddings as queries.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

MIN_POINTS_PER_CENTROID = 39  # below this Faiss' k-means is unreliable (and warns)
MAX_POINTS_PER_CENTROID = 256


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def sample_indices(n: int, cap: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a uniform sample of at most ``cap`` rows out of ``n``."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


@dataclass
class PcaModel:
    """A fitted PCA, stored as plain arrays (``.npz``, no pickle)."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D), rows are unit principal axes
    explained_variance: np.ndarray  # (d,)
    explained_variance_ratio: np.ndarray  # (d,) fraction of the total variance
    whiten: bool = False
    provenance: dict = field(default_factory=dict)  # how the fitted embeddings were made

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[0])

    def _projection(self) -> np.ndarray:
        if self.whiten:
            return self.components / np.sqrt(np.maximum(self.explained_variance, 1e-12))[:, None]
        return self.components

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Embeddings (N×D) → reduced, L2-normalised vectors (N×d)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"PCA expects vectors of dimension {self.input_dim}, got shape {x.shape}")
        return normalize_rows((x - self.mean) @ self._projection().T)

    def faiss_transform(self) -> faiss.VectorTransform:
        """The same map as :meth:`transform`, as a Faiss pre-transform chain."""
        a = self._projection().astype(np.float32)
        linear = faiss.LinearTransform(self.input_dim, self.output_dim, True)
        faiss.copy_array_to_vector(a.ravel(), linear.A)
        faiss.copy_array_to_vector((-a @ self.mean.astype(np.float32)).ravel(), linear.b)
        linear.is_trained = True
        return linear

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "explained_variance": self.explained_variance.astype(np.float32),
            "explained_variance_ratio": self.explained_variance_ratio.astype(np.float32),
            "whiten": np.array(self.whiten),
            "provenance": np.array(json.dumps(self.provenance, sort_keys=True)),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "PcaModel":
        return cls(
            mean=np.asarray(arrays["mean"]),
            components=np.asarray(arrays["components"]),
            explained_variance=np.asarray(arrays["explained_variance"]),
            explained_variance_ratio=np.asarray(arrays["explained_variance_ratio"]),
            whiten=bool(arrays["whiten"]),
            provenance=json.loads(str(arrays["provenance"])) if "provenance" in arrays else {},
        )


def fit_pca(
    x: np.ndarray,
    dim: int | None = None,
    variance: float | None = None,
    whiten: bool = False,
    seed: int = 0,
    provenance: dict | None = None,
) -> PcaModel:
    """Fit PCA on ``x`` (N×D).

    The output dimension is ``dim``, or the smallest that keeps ``variance`` of the total,
    and never more than N-1 or D (a PCA cannot have more meaningful axes than that).
    """
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float32)
    n, d_in = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {n}")
    cap = max(1, min(d_in, n - 1))
    pca = PCA(n_components=cap, svd_solver="full" if n * d_in < 4_000_000 else "covariance_eigh", random_state=seed)
    pca.fit(x)
    ratio = pca.explained_variance_ratio_
    if variance is not None:
        keep = int(np.searchsorted(np.cumsum(ratio), variance) + 1)
    else:
        keep = dim or cap
    keep = max(1, min(keep, cap))
    components = pca.components_[:keep].copy()
    # Fix each axis' sign so refits on the same data give identical vectors.
    signs = np.sign(components[np.arange(keep), np.abs(components).argmax(axis=1)])
    components *= signs[:, None]
    return PcaModel(
        mean=pca.mean_.astype(np.float32),
        components=components.astype(np.float32),
        explained_variance=pca.explained_variance_[:keep].astype(np.float32),
        explained_variance_ratio=ratio[:keep].astype(np.float32),
        whiten=whiten,
        provenance=dict(provenance or {}),
    )


def choose_nlist(n: int, per_sqrt: float = 4.0, max_nlist: int = 65536) -> int:
    """Number of IVF lists for ``n`` vectors: about ``per_sqrt``·√n, with enough points per centroid."""
    k = int(round(per_sqrt * math.sqrt(max(n, 1))))
    return max(1, min(k, n // MIN_POINTS_PER_CENTROID, max_nlist))


def train_centroids(x: np.ndarray, k: int, seed: int = 0, niter: int = 20, gpu: bool | None = None) -> np.ndarray:
    """Spherical k-means centroids (K×d) on unit vectors, trained on at most 256·K of them."""
    x = normalize_rows(x)
    n, d = x.shape
    if n < k:
        raise ValueError(f"cannot train {k} centroids on {n} vectors")
    if k == 1:
        return normalize_rows(x.mean(axis=0, keepdims=True))
    use_gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    x = x[sample_indices(n, MAX_POINTS_PER_CENTROID * k, seed)]
    kmeans = faiss.Kmeans(
        d, k, niter=niter, seed=seed, spherical=True, gpu=use_gpu,
        max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1, verbose=False,
    )
    kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def empty_ivf(centroids: np.ndarray) -> faiss.IndexIVFFlat:
    """A trained, empty inner-product IVF index over fixed centroids."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = centroids.shape
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, k, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.is_trained = True
    return index


def build_shard(centroids: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> faiss.IndexIVFFlat:
    """An IVF shard holding ``vectors`` (already PCA-reduced and normalised) under ``ids``."""
    index = empty_ivf(centroids)
    if vectors.shape[1] != index.d:
        raise ValueError(f"shard vectors have dimension {vectors.shape[1]} but the centroids have {index.d}")
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index


def shard_centroids(shard: faiss.Index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(shard)
    return faiss.rev_swig_ptr(faiss.downcast_index(ivf.quantizer).get_xb(), ivf.nlist * ivf.d).reshape(ivf.nlist, ivf.d).copy()


def ivf_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an IVF index (without copying the vectors)."""
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    ids = [faiss.rev_swig_ptr(invlists.get_ids(n), invlists.list_size(n)).copy()
           for n in range(ivf.nlist) if invlists.list_size(n)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def ivf_contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, vectors) stored in an IVF-Flat index."""
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    ids, vecs = [], []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if not size:
            continue
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size)
        vecs.append(np.frombuffer(codes.tobytes(), dtype=np.float32).reshape(size, ivf.d))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, ivf.d), np.float32)
    return np.concatenate(ids), np.concatenate(vecs)


def merge_shards(centroids: np.ndarray, shards) -> tuple[faiss.IndexIVFFlat, int]:
    """Merge shards into one IVF index; an id already present is not added again.

    Returns the merged index and how many duplicate vectors were skipped.
    """
    merged = empty_ivf(centroids)
    seen = np.zeros(0, dtype=np.int64)
    skipped = 0
    for name, shard in shards:
        ivf = faiss.extract_index_ivf(shard)
        if ivf.d != merged.d or ivf.nlist != merged.nlist or not np.array_equal(shard_centroids(ivf), centroids):
            raise ValueError(
                f"shard {name!r} was built with other centroids (d={ivf.d}, nlist={ivf.nlist}) than the current "
                f"ones (d={merged.d}, nlist={merged.nlist}); rebuild it with the current pca_model and cluster_centroids"
            )
        shard_ids = ivf_ids(ivf)
        dup = np.intersect1d(shard_ids, seen)
        if len(dup):
            ivf.remove_ids(faiss.IDSelectorBatch(dup))
            skipped += len(dup)
        seen = np.union1d(seen, shard_ids)
        merged.merge_from(ivf, 0)
    return merged, skipped


def with_pretransform(pca: PcaModel, ivf: faiss.Index) -> faiss.IndexPreTransform:
    """Wrap ``ivf`` so that it takes raw embeddings: PCA, then L2-normalisation."""
    index = faiss.IndexPreTransform(ivf)
    index.prepend_transform(faiss.NormalizationTransform(pca.output_dim, 2.0))
    index.prepend_transform(pca.faiss_transform())
    return index


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-``k`` found in the returned top-``k``."""
    hits = [len(np.intersect1d(f[:k][f[:k] >= 0], t[:k])) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k if len(hits) else 1.0


@dataclass
class RecallPoint:
    nprobe: int
    recall_at_10: float
    one_recall_at_1: float
    ms_per_query: float


def recall_curve(ivf: faiss.IndexIVF, n_queries: int = 1000, k: int = 10, seed: int = 0) -> list[RecallPoint]:
    """Recall of ``ivf`` against exact search over the same vectors, for nprobe = 1, 2, 4, … nlist.

    Queries are a sample of the indexed vectors; the exact top-k comes from a flat index.
    """
    ids, vectors = ivf_contents(ivf)
    if not len(ids):
        return []
    queries = vectors[sample_indices(len(ids), n_queries, seed)]
    flat = faiss.IndexFlatIP(ivf.d)
    flat.add(vectors)
    k = min(k, len(ids))
    _, truth_pos = flat.search(queries, k)
    truth = ids[truth_pos]
    curve = []
    nprobe = 1
    saved = ivf.nprobe
    while True:
        ivf.nprobe = nprobe
        t0 = time.perf_counter()
        _, found = ivf.search(queries, k)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        curve.append(RecallPoint(nprobe, recall_at_k(found, truth, k), float(np.mean(found[:, 0] == truth[:, 0])), ms))
        if nprobe >= ivf.nlist:
            break
        nprobe = min(nprobe * 2, ivf.nlist)
    ivf.nprobe = saved
    return curve


def choose_nprobe(curve: list[RecallPoint], target: float) -> RecallPoint:
    """The cheapest point of the curve that reaches ``target`` recall@10, else the best one."""
    for point in curve:
        if point.recall_at_10 >= target:
            return point
    return max(curve, key=lambda p: p.recall_at_10)
