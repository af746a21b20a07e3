"""How good an index is: tie-aware recall against exact search, streamed over the database.

Two losses are measured apart, on the same held-out queries:

- **ANN loss**: the index's answers vs exact search in the index's own space (after PCA),
  the only thing nprobe and the code choice decide;
- **PCA loss**: exact search after PCA vs exact search on the raw embeddings, what the
  reduction costs whatever the index does.

Recall is tie-aware, as ANN benchmarks define it: a returned neighbour counts when its exact
score reaches the k-th exact score minus :data:`TIE_EPSILON`. Among near-identical vectors
(the same photograph re-encoded fifty times) any order is equally right, so comparing ids
would count correct answers as misses.

A published index is measured by :func:`measure`, once for its metadata and again by its
recall gate: queries reach the index's space through the index's own pre-transforms, the
same code its users' queries run through and its vectors were stored with. What then
separates the index's scores from the exact ones is the rounding of two float32 dot products
of the same unit vectors, whatever the SIMD kernels (worst case 2·d·2⁻²⁴ apart, 3e-5 at
d = 256; typically √d times less), inside the tie epsilon: an exact index (Flat, or IVF
probing every list) measures 1.0 on every CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np

from imgsim_assets.core.index import distinct_chunks, ivf_ids, set_parallel_mode
from imgsim_assets.core.vectors import Collection

TIE_EPSILON = 1e-4  # on unit vectors: well above float32 rounding, far below any real gap
BLOCK_ROWS = 8192  # database rows scored at once: queries × BLOCK_ROWS floats in memory

Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclass
class RecallPoint:
    nprobe: int
    recall_at_10: float  # tie-aware, the index vs exact search in its space
    one_recall_at_1: float  # tie-aware: the first answer is (as good as) the true first
    ms_per_query: float  # median latency of single-query searches


@dataclass
class RecallCurve:
    """The ANN recall of an index, one point per nprobe tried, and the PCA loss (what the
    reduction costs). Copy detection is measured elsewhere (:mod:`core.evaluation`)."""

    curve: list[RecallPoint]
    pca_recall_at_10: float = 1.0  # exact search after PCA vs on raw embeddings
    pca_one_recall_at_1: float = 1.0
    num_queries: int = 0
    epsilon: float = TIE_EPSILON
    database_fraction: float = 1.0  # of the indexed vectors the truth and the answers were limited to

    def cheapest(self, target: float) -> RecallPoint:
        """The cheapest point reaching ``target`` recall@10, else the best one; with no point
        measured (no query could be drawn), the exact answer at one probe."""
        if not self.curve:
            return RecallPoint(1, 1.0, 1.0, 0.0)
        return next((p for p in self.curve if p.recall_at_10 >= target), max(self.curve, key=lambda p: p.recall_at_10))

    def metadata(self) -> dict:
        return {"pca_recall_at_10": self.pca_recall_at_10, "pca_one_recall_at_1": self.pca_one_recall_at_1,
                "recall_queries": self.num_queries, "tie_epsilon": self.epsilon,
                "recall_database_fraction": round(self.database_fraction, 6)}


@dataclass
class _TopK:
    """The best ``k`` scores per query seen so far, with ids and one payload value each."""

    k: int
    scores: np.ndarray = field(init=False)
    ids: np.ndarray = field(init=False)
    payload: np.ndarray = field(init=False)
    nq: int = 0

    def __post_init__(self) -> None:
        self.scores = np.full((self.nq, self.k), -np.inf, np.float32)
        self.ids = np.full((self.nq, self.k), -1, np.int64)
        self.payload = np.full((self.nq, self.k), -np.inf, np.float32)

    def add(self, scores: np.ndarray, ids: np.ndarray, payload: np.ndarray | None = None) -> None:
        take = min(self.k, scores.shape[1])
        cols = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        rows = np.arange(len(scores))[:, None]
        payload = scores if payload is None else payload
        all_s = np.concatenate([self.scores, scores[rows, cols]], axis=1)
        all_i = np.concatenate([self.ids, ids[cols]], axis=1)
        all_p = np.concatenate([self.payload, payload[rows, cols]], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_s, order, axis=1)
        self.ids = np.take_along_axis(all_i, order, axis=1)
        self.payload = np.take_along_axis(all_p, order, axis=1)
        self.ids[~np.isfinite(self.scores)] = -1


def _regrouped(chunks: Iterable[tuple[np.ndarray, np.ndarray]], rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The chunks' rows in chunks of at least ``rows`` (the last may be smaller): a database
    sample of a tenth of each batch file comes in slivers, and scoring costs per call."""
    ids, vectors, held = [], [], 0
    for chunk_ids, chunk_vectors in chunks:
        ids.append(chunk_ids)
        vectors.append(chunk_vectors)
        held += len(chunk_ids)
        if held >= rows:
            yield np.concatenate(ids), np.concatenate(vectors)
            ids, vectors, held = [], [], 0
    if held:
        yield np.concatenate(ids), np.concatenate(vectors)


def tie_aware_recall(found_scores: np.ndarray, truth_scores: np.ndarray, epsilon: float = TIE_EPSILON) -> tuple[float, float]:
    """(recall@k, 1-recall@1) of answers whose *exact* scores are ``found_scores`` (−inf where
    nothing was returned) against the exact top-k scores ``truth_scores``, both best first."""
    available = np.isfinite(truth_scores).sum(axis=1)
    rows = available > 0
    if not rows.any():
        return 1.0, 1.0
    found, truth, m = found_scores[rows], truth_scores[rows], available[rows]
    kth = truth[np.arange(len(truth)), m - 1]
    hits = np.minimum((found >= kth[:, None] - epsilon).sum(axis=1), m)
    first = found[:, 0] >= truth[:, 0] - epsilon
    return float(np.mean(hits / m)), float(np.mean(first))


SAMPLE_MODULUS = 1_000_003  # ids are hashes: id mod a prime is uniform


def in_sample(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Which ``ids`` belong to the fixed ``fraction`` sample (the same ids every time)."""
    return (np.asarray(ids, dtype=np.int64) % SAMPLE_MODULUS) < round(fraction * SAMPLE_MODULUS)


def search_excluding_self(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, k: int,
                          params: faiss.SearchParameters | None = None) -> np.ndarray:
    """Top-``k`` ids from ``index`` with each query's own id removed (-1 where fewer)."""
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1, params=params)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (ids, own) in enumerate(zip(found, query_ids)):
        ids = ids[(ids != own) & (ids >= 0)][:k]
        out[row, : len(ids)] = ids
    return out


def _ivf_or_none(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def single_query_ms(index: faiss.Index, queries: np.ndarray, k: int = 10, n: int = 200) -> float:
    """Median wall time of one-query searches, in ms (what an interactive user waits)."""
    times = []
    set_parallel_mode(index, 1)
    for q in np.ascontiguousarray(queries[:n], dtype=np.float32):
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t0)
    set_parallel_mode(index, len(queries))
    return float(np.median(times) * 1000) if times else 0.0


def nprobe_ladder(nlist: int, max_nprobe: int | None = None) -> list[int]:
    """nprobe = 1, 2, 4, … up to ``nlist`` (or ``max_nprobe``), the last one included."""
    top = min(nlist, max_nprobe or nlist)
    ladder = [1]
    while ladder[-1] < top:
        ladder.append(min(ladder[-1] * 2, top))
    return ladder


def searched_space(index: faiss.Index) -> tuple[faiss.Index, Callable[[np.ndarray], np.ndarray] | None]:
    """(the index that is searched, the map of raw vectors into its space): a published index
    carries its PCA as pre-transforms, which are applied here as its queries meet them."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexPreTransform):
        return index, None
    steps = [index.chain.at(i) for i in range(index.chain.size())]

    def to_space(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        for step in steps:
            x = step.apply(x) if len(x) else np.zeros((0, step.d_out), np.float32)
        return x

    to_space.index = index  # the chain's owner lives as long as the map
    return faiss.downcast_index(index.index), to_space


def evaluate(
    index: faiss.Index,
    queries: np.ndarray,
    query_ids: np.ndarray,
    database: Chunks,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    nprobes: Sequence[int] | None = None,
    k: int = 10,
    latency_queries: int = 200,
    pca_loss: bool = True,
    max_database: int | None = None,
) -> RecallCurve:
    """Tie-aware recall of ``index`` at each of ``nprobes`` (default: as it is set) on held-out
    queries, and the PCA loss when ``transform`` maps raw vectors into the index's space.

    With ``max_database`` below the index's size, answers and truth are both limited to a fixed
    sample of about that many database ids (:func:`in_sample`): the cost of the exact pass no
    longer grows with the collection, and the recall is that of finding neighbours within the
    sample, which is no easier than within everything.

    ``queries`` and the chunks of ``database()`` (``(ids, vectors)``, streamed once, an id met
    twice counted once, as in the index) are raw vectors; a query's own id is left out of
    both the answers and the truth. Queries that are not in the database have id -1.
    ``pca_loss=False`` skips the raw-space truth (the PCA loss is then reported as 1.0). An
    ``index`` with pre-transforms is searched in its own space, ``transform`` being its chain.
    """
    index, own = searched_space(index)
    if own is not None:
        if transform is not None:
            raise ValueError("an index with pre-transforms maps queries itself: pass no transform")
        transform = own
    space = transform or (lambda x: np.ascontiguousarray(x, dtype=np.float32))
    raw_q = np.ascontiguousarray(queries, dtype=np.float32)
    q = space(raw_q)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    nq = len(q)
    ivf = _ivf_or_none(index)
    settings = list(nprobes) if nprobes else [int(ivf.nprobe) if ivf is not None else 0]

    fraction = 1.0
    selector = None
    if max_database and ivf is not None and ivf.ntotal > max_database:
        fraction = max_database / ivf.ntotal
        sampled = ivf_ids(ivf)
        selector = faiss.IDSelectorBatch(sampled[in_sample(sampled, fraction)])

    answers, latency = [], []
    saved = ivf.nprobe if ivf is not None else None
    for nprobe in settings:
        if ivf is not None and nprobe:
            ivf.nprobe = nprobe
        set_parallel_mode(index, nq)
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe)) if selector is not None else None
        answers.append(search_excluding_self(index, q, query_ids, k, params))
        latency.append(single_query_ms(index, q, k, n=latency_queries))
    if ivf is not None:
        ivf.nprobe = saved

    in_space = _TopK(k, nq=nq)  # exact top-k after PCA, carrying each one's raw score
    raw = _TopK(k, nq=nq)  # exact top-k on raw vectors
    found_scores = [np.full((nq, k), -np.inf, np.float32) for _ in settings]
    wanted = [np.where(a >= 0, a, np.iinfo(np.int64).min) for a in answers]
    chunks = database()
    if fraction < 1.0:  # membership depends on the id alone: sample first, then drop repeats of the few left
        chunks = ((ids[keep], vectors[keep]) for ids, vectors in chunks for keep in [in_sample(ids, fraction)])
    for ids, vectors in _regrouped(distinct_chunks(chunks), BLOCK_ROWS):
        for start in range(0, len(ids), BLOCK_ROWS):
            block_ids = ids[start : start + BLOCK_ROWS]
            block = np.ascontiguousarray(vectors[start : start + BLOCK_ROWS], dtype=np.float32)
            own = block_ids[None, :] == query_ids[:, None]
            scores = q @ space(block).T
            scores[own] = -np.inf
            raw_scores = None
            if transform is not None and pca_loss:
                raw_scores = raw_q @ block.T
                raw_scores[own] = -np.inf
                raw.add(raw_scores, block_ids)
            in_space.add(scores, block_ids, raw_scores)
            order = np.argsort(block_ids, kind="stable")
            sorted_ids = block_ids[order]
            for want, out in zip(wanted, found_scores):
                pos = np.minimum(np.searchsorted(sorted_ids, want), len(order) - 1)
                hit = sorted_ids[pos] == want
                out[hit] = scores[np.nonzero(hit)[0], order[pos[hit]]]

    curve = []
    for nprobe, scores, ms in zip(settings, found_scores, latency):
        recall, one = tie_aware_recall(scores, in_space.scores)
        curve.append(RecallPoint(int(nprobe), recall, one, ms))
    measured = transform is not None and pca_loss
    pca_recall, pca_one = tie_aware_recall(in_space.payload, raw.scores) if measured else (1.0, 1.0)
    return RecallCurve(curve, pca_recall, pca_one, nq, database_fraction=fraction)


def tune(
    index: faiss.Index,
    queries: np.ndarray,
    query_ids: np.ndarray,
    database: Chunks,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    target: float,
    nprobes: Sequence[int] | None = None,
    per_round: int = 4,
    max_database: int | None = None,
) -> RecallCurve:
    """:func:`evaluate` along the nprobe ladder a few points at a time, cheapest first, until a
    round reaches ``target``: one more exact pass per round costs far less than probing
    thousands of lists that will not be chosen. The curve holds the points measured."""
    ivf = _ivf_or_none(index)
    ladder = list(nprobes or (nprobe_ladder(ivf.nlist) if ivf is not None else [0]))
    result: RecallCurve | None = None
    for start in range(0, len(ladder), per_round):
        part = evaluate(index, queries, query_ids, database, transform, ladder[start : start + per_round],
                        pca_loss=result is None, max_database=max_database)
        if result is None:
            result = part
        else:
            result.curve += part.curve
        if any(p.recall_at_10 >= target for p in part.curve):
            break
    return result


def measure(index: faiss.Index, data: Collection, queries: int, seed: int, nprobes: Sequence[int] | None = None,
            target: float | None = None, max_database: int | None = None) -> RecallCurve:
    """Tie-aware recall of a published ``index`` (raw embeddings in, its PCA as pre-transforms)
    and its PCA loss, on ``queries`` of its own vectors (``data``) sampled with ``seed``, each
    searched with itself left out, against exact search over all of them (or a fixed sample of
    about ``max_database``). With a ``target``, nprobe is tuned (:func:`tune`) instead of
    measured as set. The index's metadata and its recall gate are both measured here."""
    inner, _ = searched_space(index)
    query_ids, raw = data.sample(queries, seed)
    keep = np.isin(query_ids, ivf_ids(inner))
    args = (index, raw[keep], query_ids[keep], data.chunks)
    if target is not None:
        return tune(*args, target=target, nprobes=nprobes, max_database=max_database)
    return evaluate(*args, nprobes=nprobes, max_database=max_database)
