"""PCA, k-means centroids, the sized IVF layout, shards and merging: the one path every index
is built by (the assets and the benchmarks call these functions; recall is measured in
:mod:`recall`).

Vectors flow as: embedding (D) → PCA (d) → L2-normalise → IVF over the trained centroids,
compared by inner product. A shard is one batch's inverted lists in the trained layout (ids,
list numbers, codes; the centroids and code tables stay in the template); the searchable
index merges them and carries the PCA as a Faiss pre-transform, so it
takes raw embeddings as queries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Iterator

import faiss
import numpy as np

MIN_POINTS_PER_CENTROID = 39  # below this Faiss' k-means is unreliable (and warns)
MAX_POINTS_PER_CENTROID = 256
TRAIN_POINTS_PER_CENTROID = 64  # k-means sample per centroid: IVF recall is flat above ~40
KMEANS_ITERATIONS = 10
LISTS_PER_SQRT = 4.0  # IVF lists per √N (4 to 16 is the useful range)
EXACT_MAX = 20_000  # up to this many vectors, search exactly
MEMORY_BUDGET_MB = 4096  # what an index (codes, ids, centroids) may take by default


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
    train_residual: float = float("nan")  # mean residual_fraction() of the fitting sample
    spectrum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # variance ratio of every fitted axis

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
        """Embeddings (N×D) → reduced, L2-normalised vectors (N×d), by :meth:`faiss_chain`: the
        very code the published index runs on its queries, so stored and query vectors agree."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"PCA expects vectors of dimension {self.input_dim}, got shape {x.shape}")
        if not len(x):
            return np.zeros((0, self.output_dim), np.float32)
        for step in self._chain:
            x = step.apply(x)
        return x

    def residual_fraction(self, x: np.ndarray) -> np.ndarray:
        """Per vector, the share of its (centred) energy the kept axes do not explain.

        New data far from what the PCA was fitted on has a larger residual: the drift measure.
        """
        centred = np.asarray(x, dtype=np.float32) - self.mean
        kept = centred @ self.components.T
        total = np.maximum((centred**2).sum(axis=1), 1e-12)
        return np.clip(1.0 - (kept**2).sum(axis=1) / total, 0.0, 1.0)

    def faiss_chain(self) -> list[faiss.VectorTransform]:
        """This PCA as Faiss pre-transforms: centre, project, L2-normalise.

        Centring comes first, as its own step: folding the mean into the projection's bias
        (``x·Aᵀ − A·mean``) cancels catastrophically when embeddings lie close to their mean,
        and after normalisation the rounding, which differs with the CPU's SIMD kernels, grows
        to 1e-2. ``x − mean`` is exact for nearby values, so nothing is lost."""
        centre = faiss.CenteringTransform(self.input_dim)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.mean, dtype=np.float32), centre.mean)
        centre.is_trained = True
        project = faiss.LinearTransform(self.input_dim, self.output_dim, False)
        faiss.copy_array_to_vector(np.ascontiguousarray(self._projection(), dtype=np.float32).ravel(), project.A)
        project.is_trained = True
        return [centre, project, faiss.NormalizationTransform(self.output_dim, 2.0)]

    @cached_property
    def _chain(self) -> list[faiss.VectorTransform]:
        return self.faiss_chain()

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "explained_variance": self.explained_variance.astype(np.float32),
            "explained_variance_ratio": self.explained_variance_ratio.astype(np.float32),
            "whiten": np.array(self.whiten),
            "provenance": np.array(json.dumps(self.provenance, sort_keys=True)),
            "train_residual": np.array(self.train_residual, dtype=np.float64),
            "spectrum": self.spectrum.astype(np.float32),
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
            train_residual=float(arrays["train_residual"]) if "train_residual" in arrays else float("nan"),
            spectrum=np.asarray(arrays["spectrum"]) if "spectrum" in arrays else np.zeros(0, np.float32),
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
    model = PcaModel(
        mean=pca.mean_.astype(np.float32),
        components=components.astype(np.float32),
        explained_variance=pca.explained_variance_[:keep].astype(np.float32),
        explained_variance_ratio=ratio[:keep].astype(np.float32),
        whiten=whiten,
        provenance=dict(provenance or {}),
        spectrum=ratio.astype(np.float32),
    )
    model.train_residual = float(model.residual_fraction(x).mean())
    return model


def choose_nlist(n: int, per_sqrt: float = LISTS_PER_SQRT, max_nlist: int = 65536) -> int:
    """Number of IVF lists for ``n`` vectors: about ``per_sqrt``·√n, with enough points per centroid."""
    k = int(round(per_sqrt * math.sqrt(max(n, 1))))
    return max(1, min(k, n // MIN_POINTS_PER_CENTROID, max_nlist))


def feasible_nlist(n: int, requested: int | None = None, per_sqrt: float = LISTS_PER_SQRT) -> tuple[int, list[str]]:
    """``requested`` lists (default about ``per_sqrt``·√n) if ``n`` vectors can train them, else
    the default, with a note saying why."""
    if requested is None:
        return choose_nlist(n, per_sqrt), []
    if requested > max(1, n // MIN_POINTS_PER_CENTROID):
        fallback = choose_nlist(n, per_sqrt)
        return fallback, [f"nlist {requested} needs {requested * MIN_POINTS_PER_CENTROID} vectors, have {n}: "
                          f"using {fallback}"]
    return max(1, requested), []


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


# The codes a plan chooses from, most precise first, by their name in Faiss' factory strings
# (Faiss builds and trains them) and their bytes per vector of dimension d. PQ<m> (m bytes,
# m dividing d) follows them, largest m first.
CODES = {
    "Flat": lambda d: 4 * d,  # float32: exact distances
    "SQ8": lambda d: d,  # one byte per dimension
}
ID_BYTES = 8
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_CENTROID  # a PQ sub-quantizer has 256 centroids


@dataclass(frozen=True)
class IndexPlan:
    """The Faiss layout for a collection: ``nlist`` inverted lists (1 = exact search) and a code."""

    nlist: int
    codec: str  # a key of CODES, or "PQ<m>" (m bytes)
    dim: int
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return self.nlist == 1 and self.codec == "Flat"

    @property
    def code_bytes(self) -> int:
        size = code_bytes(self.codec, self.dim)
        if size is None:
            raise ValueError(f"unknown or invalid code {self.codec!r} for dimension {self.dim}: use "
                             f"{', '.join(CODES)} or PQ<m> with m dividing {self.dim}")
        return size

    def memory_bytes(self, n: int) -> int:
        """Vectors, ids and centroids of an index holding ``n`` vectors."""
        return n * (self.code_bytes + ID_BYTES) + self.nlist * self.dim * 4

    @property
    def factory(self) -> str:
        return "Flat" if self.exact else f"IVF{self.nlist},{self.codec}"


def code_bytes(codec: str, dim: int) -> int | None:
    """Bytes per vector of ``codec`` at dimension ``dim``; None for a code that does not exist there."""
    if codec in CODES:
        return CODES[codec](dim)
    if codec.startswith("PQ") and codec[2:].isdigit() and int(codec[2:]) > 0 and dim % int(codec[2:]) == 0:
        return int(codec[2:])
    return None


def _pq_sizes(d: int) -> list[int]:
    """PQ byte counts that divide ``d``, largest first (at least 2 dimensions per sub-vector)."""
    return [m for m in range(d // 2, 0, -1) if d % m == 0]


def plan_index(
    n: int,
    dim: int,
    memory_budget_bytes: int = MEMORY_BUDGET_MB << 20,
    exact_max: int = EXACT_MAX,
    per_sqrt: float = LISTS_PER_SQRT,
    nlist: int | None = None,
    codec: str | None = None,
    train_samples: int | None = None,
) -> IndexPlan:
    """Choose the index for ``n`` vectors of dimension ``dim`` within a memory budget.

    Up to ``exact_max`` vectors: exact search (one list), whatever ``nlist`` asks. Above: IVF
    with ``nlist`` lists (default about ``per_sqrt``·√n) and the most precise code that fits
    the budget (Flat, then SQ8, then the largest PQ). ``codec`` forces a code; an impossible
    choice (too few vectors to train it) falls back to a smaller valid configuration and says
    so in ``notes``.
    """
    train_samples = n if train_samples is None else train_samples
    if n <= exact_max:
        nlist = 1
    nlist, notes = feasible_nlist(n, nlist, per_sqrt)
    if codec is None:
        for candidate in [*CODES, *(f"PQ{m}" for m in _pq_sizes(dim))]:
            codec = candidate
            if IndexPlan(nlist, candidate, dim).memory_bytes(n) <= memory_budget_bytes:
                break
        else:
            notes.append(f"nothing fits {memory_budget_bytes >> 20} MiB; using the smallest code, {codec}")
    IndexPlan(nlist, codec, dim).code_bytes  # a code that does not exist at this dimension stops here
    if codec.startswith("PQ") and train_samples < PQ_MIN_TRAIN:
        notes.append(f"{codec} needs {PQ_MIN_TRAIN} training vectors, have {train_samples}: using SQ8")
        codec = "SQ8"
    return IndexPlan(nlist=nlist, codec=codec, dim=dim, notes=tuple(notes))


def empty_ivf(centroids: np.ndarray, codec: str = "Flat") -> faiss.IndexIVF:
    """An inner-product IVF index over fixed centroids (trained quantizer, empty lists), made
    from its factory string. ``Flat`` needs no further training; ``SQ8``/``PQ<m>`` codes still
    do (:func:`train_template`)."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = centroids.shape
    index = faiss.index_factory(d, f"IVF{k},{codec}", faiss.METRIC_INNER_PRODUCT)  # already its IVF class
    index.quantizer.add(centroids)  # Faiss then skips k-means when the code is trained
    if isinstance(index, faiss.IndexIVFFlat):
        index.is_trained = True  # nothing else to train
    return index


def train_template(centroids: np.ndarray, codec: str = "Flat", sample: np.ndarray | None = None) -> faiss.IndexIVF:
    """The trained, empty index every shard starts from: fixed centroids plus a trained code."""
    index = empty_ivf(centroids, codec)
    if not index.is_trained:
        if sample is None or not len(sample):
            raise ValueError(f"the {codec} code needs training vectors")
        index.train(np.ascontiguousarray(sample, dtype=np.float32))  # the quantizer is kept as is
    return index


def code_training_size(nlist: int) -> int:
    """How many vectors train an index's code (SQ ranges, PQ codebooks): 64 per list, and at
    least 64·256, as many as a PQ sub-quantizer's 256 centroids want."""
    return TRAIN_POINTS_PER_CENTROID * max(nlist, 256)


def build_template(plan: IndexPlan, sample: np.ndarray, centroids: np.ndarray | None = None, seed: int = 0,
                   niter: int = KMEANS_ITERATIONS) -> faiss.IndexIVF:
    """The trained, empty index of ``plan`` for vectors like ``sample`` (PCA-reduced, unit): IVF
    over ``centroids``, trained on ``sample`` when not given or not ``plan.nlist`` of them (one
    list: the sample's mean direction), with the code trained on ``sample``."""
    if centroids is None or len(centroids) != plan.nlist:
        centroids = train_centroids(sample, plan.nlist, seed=seed, niter=niter)
    return train_template(centroids, plan.codec, sample)


def factory_of(index: faiss.Index) -> str:
    """The layout of an index in Faiss' factory vocabulary, read off the index itself;
    ``Flat`` for exact search (one list of float vectors)."""
    from faiss.contrib.factory_tools import reverse_index_factory

    name = reverse_index_factory(faiss.extract_index_ivf(index))
    return "Flat" if name == "IVF1,Flat" else name


def memory_bytes(index: faiss.Index) -> int:
    """What an IVF index holds in memory: codes, ids and centroids."""
    ivf = faiss.extract_index_ivf(index)
    return int(ivf.ntotal) * (ivf.code_size + ID_BYTES) + int(ivf.nlist) * ivf.d * 4


def layout_fingerprint(index: faiss.Index) -> str:
    """Identifies the centroids and trained code of an IVF index, not its contents."""
    import hashlib

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    h = hashlib.sha256(f"{type(ivf).__name__}:{ivf.d}:{ivf.nlist}:{ivf.code_size}".encode())
    h.update(shard_centroids(ivf).tobytes())
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        h.update(faiss.vector_to_array(ivf.sq.trained).tobytes())
    elif isinstance(ivf, faiss.IndexIVFPQ):
        h.update(faiss.vector_to_array(ivf.pq.centroids).tobytes())
    return h.hexdigest()[:16]


def build_shard(template: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, layout: str | None = None) -> Shard:
    """A shard: ``vectors`` (PCA-reduced, unit) under ``ids``, encoded and assigned to lists by
    the trained ``template`` (whose ``layout_fingerprint`` a caller building many may pass)."""
    index = faiss.clone_index(template)
    if vectors.shape[1] != index.d:
        raise ValueError(f"shard vectors have dimension {vectors.shape[1]} but the trained index has {index.d}")
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return Shard.from_index(index, layout or layout_fingerprint(template))


@dataclass
class Shard:
    """One batch in the trained layout: its inverted lists alone (ids, list numbers and codes, in
    list order), without the centroids and code tables every shard shares, which the trained
    template holds once; and how far the batch is from what PCA was fitted on (its mean PCA
    residual, and that over the training sample's: the drift)."""

    layout: str  # layout_fingerprint of the trained index the codes belong to
    ids: np.ndarray  # int64, one per vector
    lists: np.ndarray  # int64, each vector's inverted list, ascending
    codes: np.ndarray  # uint8, (vectors, code_size)
    pca_residual: float = float("nan")
    drift: float = float("nan")

    @classmethod
    def build(cls, template: faiss.IndexIVF, pca: PcaModel, ids: np.ndarray, embeddings: np.ndarray,
              reduced: np.ndarray | None = None, layout: str | None = None) -> "Shard":
        """``embeddings`` under ``ids`` in ``template``'s layout; ``reduced``: their PCA transform,
        and ``layout``: the template's fingerprint, when the caller has them already."""
        shard = build_shard(template, ids, pca.transform(embeddings) if reduced is None else reduced, layout)
        shard.pca_residual = float(pca.residual_fraction(embeddings).mean()) if len(embeddings) else float("nan")
        shard.drift = shard.pca_residual / pca.train_residual if pca.train_residual > 0 else float("nan")
        return shard

    @classmethod
    def from_index(cls, index: faiss.Index, layout: str | None = None) -> "Shard":
        """The inverted lists of a filled IVF index."""
        ivf = faiss.extract_index_ivf(index)
        invlists, size = ivf.invlists, ivf.code_size
        ids, lists, codes = [], [], []
        for n in range(ivf.nlist):
            count = invlists.list_size(n)
            if count:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(n), count).copy())
                codes.append(faiss.rev_swig_ptr(invlists.get_codes(n), count * size).copy())
                lists.append(np.full(count, n, np.int64))
        return cls(layout or layout_fingerprint(ivf), concat(ids), concat(lists),
                   concat(codes, np.uint8).reshape(-1, size))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self) -> "Shard":
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"layout": np.array(self.layout), "ids": self.ids, "lists": self.lists, "codes": self.codes,
                "pca_residual": np.array(self.pca_residual), "drift": np.array(self.drift)}

    @classmethod
    def from_arrays(cls, arrays) -> "Shard":
        figures = float(arrays["pca_residual"]), float(arrays["drift"])
        if "index" in arrays:  # written whole, centroids included, by earlier versions
            shard = cls.from_index(faiss.deserialize_index(np.asarray(arrays["index"])))
            shard.pca_residual, shard.drift = figures
            return shard
        return cls(str(arrays["layout"]), arrays["ids"], arrays["lists"], arrays["codes"], *figures)


@dataclass(frozen=True)
class ShardFile:
    """A shard on disk (``Shard.to_arrays`` as ``.npz``), read when merged: its fingerprint and
    ids first (bytes per vector), its codes one shard at a time, so a merge never holds every
    shard's codes besides the merged index's."""

    path: str

    def _read(self, *names: str):
        with np.load(self.path, allow_pickle=False) as arrays:
            if "index" in arrays:  # written whole by earlier versions
                shard = Shard.from_arrays(arrays)
                return tuple(getattr(shard, n) for n in names)
            return tuple(str(arrays[n]) if n == "layout" else arrays[n] for n in names)

    @cached_property
    def _head(self) -> tuple:
        """What is read before the codes, in one opening: fingerprint, ids and drift."""
        return self._read("layout", "ids", "drift")

    @property
    def layout(self) -> str:
        return self._head[0]

    @property
    def ids(self) -> np.ndarray:
        return self._head[1]

    @property
    def drift(self) -> float:
        return float(self._head[2])

    def load(self) -> Shard:
        with np.load(self.path, allow_pickle=False) as arrays:
            return Shard.from_arrays(arrays)


def shard_centroids(shard: faiss.Index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(shard)
    return faiss.rev_swig_ptr(faiss.downcast_index(ivf.quantizer).get_xb(), ivf.nlist * ivf.d).reshape(ivf.nlist, ivf.d).copy()


def concat(parts: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    """``np.concatenate`` of ``parts``, or an empty array of ``dtype`` when there are none."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def ivf_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an IVF index (without copying the vectors)."""
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    ids = [faiss.rev_swig_ptr(invlists.get_ids(n), invlists.list_size(n)).copy()
           for n in range(ivf.nlist) if invlists.list_size(n)]
    return concat(ids)


def list_sizes(index: faiss.Index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def merge_shards(template: faiss.IndexIVF, shards: Iterable[tuple[str, Shard | ShardFile]]) -> tuple[faiss.IndexIVF, int]:
    """Merge shards (in memory, or files read one at a time) into one index; an id already
    present (in an earlier shard) is not added again. Each list holds its entries in shard
    order, as adding the shards one after another would.

    Returns the merged index and how many duplicate vectors were skipped.
    """
    merged = faiss.clone_index(template)
    expected = layout_fingerprint(merged)
    shards = list(shards)
    ids = []
    for name, shard in shards:
        if shard.layout != expected:
            raise ValueError(
                f"shard {name!r} was built with another trained index than the current one "
                f"({type(merged).__name__}, d={merged.d}, nlist={merged.nlist}); "
                "rebuild it with the current pca_model and cluster_centroids"
            )
        ids.append(shard.ids)
    # Which entries an earlier shard already holds: one sort over all ids (8 bytes each); the
    # codes are copied shard by shard into the lists, never gathered into one more copy.
    sizes = [len(i) for i in ids]
    ids = concat(ids)
    keep = np.zeros(len(ids), bool)
    keep[np.unique(ids, return_index=True)[1]] = True
    invlists, start = merged.invlists, 0
    for (_, source), size in zip(shards, sizes):
        shard = source.load()
        kept = keep[start : start + size]
        start += size
        shard_ids, lists, codes = shard.ids, shard.lists, shard.codes
        if not kept.all():
            shard_ids, lists, codes = shard_ids[kept], lists[kept], codes[kept]
        bounds = np.flatnonzero(np.diff(lists, prepend=-1, append=merged.nlist))  # lists ascend within a shard
        for a, b in zip(bounds[:-1], bounds[1:]):
            invlists.add_entries(int(lists[a]), int(b - a), faiss.swig_ptr(shard_ids[a:b]), faiss.swig_ptr(codes[a:b]))
        merged.ntotal += len(shard_ids)
    return merged, int(len(ids) - keep.sum())


def set_parallel_mode(index: faiss.Index, num_queries: int) -> None:
    """Few queries: spread one query's inverted lists over the cores; many: one query per core."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index: nothing to choose
        return
    ivf.parallel_mode = 1 if num_queries < faiss.omp_get_max_threads() else 0


def with_pretransform(pca: PcaModel, ivf: faiss.Index) -> faiss.IndexPreTransform:
    """Wrap ``ivf`` so that it takes raw embeddings: :meth:`PcaModel.faiss_chain` before it."""
    index = faiss.IndexPreTransform(ivf)
    for step in reversed(pca.faiss_chain()):
        index.prepend_transform(step)
    return index


def has_legacy_pretransform(index: faiss.Index) -> bool:
    """Whether ``index`` centres by a bias folded into its PCA (indexes published before the
    pre-transform centred first): its queries then lose precision near the mean."""
    if not isinstance(index, faiss.IndexPreTransform) or index.chain.size() == 0:
        return False
    first = faiss.downcast_VectorTransform(index.chain.at(0))
    return isinstance(first, faiss.LinearTransform) and bool(first.have_bias)


def distinct_chunks(chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                    seen: set[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors)`` chunks with every id kept only the first time it is met (an image in
    several batches is one vector, as in the index), or not at all when it is in ``seen``."""
    seen = set() if seen is None else set(seen)  # linear in the ids met (a sorted array re-merged per chunk is quadratic)
    for ids, vectors in chunks:
        ids = np.asarray(ids)
        keep = np.fromiter((i not in seen for i in ids.tolist()), dtype=bool, count=len(ids))
        _, first = np.unique(ids, return_index=True)  # an id twice in one chunk: its first row
        once = np.zeros(len(ids), dtype=bool)
        once[first] = True
        keep &= once
        seen.update(ids[keep].tolist())
        yield ids[keep], vectors[keep]


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine similarity to its centroid) of each unit vector."""
    sims, clusters = faiss.knn(np.ascontiguousarray(vectors, dtype=np.float32), centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return clusters[:, 0], sims[:, 0]
