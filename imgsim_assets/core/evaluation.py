"""How well the index finds edited copies of the collection's own images, and which similarity
means "copy of the same image" there.

A seeded sample of indexed images is copied with every edit family of :mod:`copies`; the
copies are embedded like any query and searched. Each copy has one right answer, its source
(and any image whose vector is identical to it). Images of the collection that may be copies
of the source are *unlabelled*: they may be duplicates the collection already holds, or may
not, so they count neither way (as the revisited Oxford and Paris benchmarks treat their "junk"
images). The evidence is the source's own copies, not the threshold being fitted: an image is a
possible copy when it is as close to the source as the lower quartile of the copies that stand
out of the collection. On a collection that already holds mirrored, cropped or resized copies,
those are then neither counted as mistakes of the copies nor allowed to push the threshold
above every copy the collection holds. That holds only where the median copy is closer to its
source than 90 % of the collection is; where it is not, the encoder cannot tell copies from the
rest: nothing is left out, and only the source itself is right. Everything else returned is a
non-copy.

From the scores this gives recall@1, recall@10 and mAP per family, the scores of true copies
against the nearest non-copy, the precision–recall curve of "score ≥ t means same image", the
lowest threshold that reaches a target precision (checked on held-out sources), and which
grouping rule of :mod:`duplicates` keeps the planted groups apart best.

The scores live in whatever :class:`Space` the caller searches: the published index's own
(:class:`IndexSpace`) or a flat one built for a comparison (:class:`FlatSpace`).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import faiss
import numpy as np
from PIL import Image, ImageOps

from imgsim_assets.core import copies as cp
from imgsim_assets.core import duplicates
from imgsim_assets.core.index import concat
from imgsim_assets.core.index import set_parallel_mode
from imgsim_assets.core.recall import TIE_EPSILON

MAX_SIDE = 2048  # copies are made from the picture scaled down to this (more changes nothing at model resolution)
CHUNK_SOURCES = 32  # sources whose copies are on disk at once
SCORE_ROWS = 256  # copies scored at once (k candidate vectors each)
NULL_QUANTILE = 0.9  # a source's median copy must be closer than this share of the collection (see score_copies)
STANDS_OUT = 0.99  # a copy closer to its source than this share of the collection is recognisably its copy
HELD_COPIES = 4  # ...and than all but this many images of it: copies the collection holds may be closer
# An image as close to a source as the lower quartile of its recognisable copies may be a copy the
# collection already holds: edits that strong are what the planted families make. (The weakest
# copies reach the scores of unrelated neighbours, and would hide them; the median would count
# the collection's own mirrored or cropped copies as mistakes.)
POSSIBLE_COPY_QUANTILE = 0.25


@dataclass(frozen=True)
class CopyDetectionSettings:
    """``retrieval_eval``'s settings; its Dagster config, ``imgsim evaluate`` and the benchmarks
    take their defaults from here."""

    sample_size: int = 200  # indexed images copied (all of them if fewer)
    families: tuple[str, ...] = tuple(cp.FAMILIES)  # edit families
    seed: int = 0  # chooses the sample and every edit's strength
    duplicate_precision: float = 0.99  # precision the duplicate threshold must reach for "copy of the same image"
    k: int = 100  # results per copy; non-copies are counted among these


_DEFAULTS = CopyDetectionSettings()


@dataclass(frozen=True)
class Source:
    image_id: int
    path: Path
    root: Path | None = None  # read only inside this folder (default: the file's own folder)


Embed = Callable[[list[str], str], tuple[list, np.ndarray]]  # (paths, root) → (records, vectors of the ok ones)


class Space(Protocol):
    """Where copies and sources are compared."""

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Raw embeddings → vectors of this space."""

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of indexed ids (KeyError for one that is not)."""

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the ``k`` best, best first; ids -1 where fewer exist."""

    def ids(self) -> np.ndarray:
        """Every id stored."""


class IndexSpace:
    """The published index as queries meet it: its PCA, its codes, its nprobe."""

    def __init__(self, index) -> None:  # search.ImageIndex
        self.index = index

    def transform(self, raw):
        return self.index.to_index_space(raw)

    def vectors(self, ids):
        return self.index.stored_vectors(np.asarray(ids, dtype=np.int64))

    def search(self, x, k):
        x = np.ascontiguousarray(x, dtype=np.float32)
        set_parallel_mode(self.index.index, len(x))
        return self.index.ivf.search(x, min(k, max(self.index.num_vectors, 1)))

    def ids(self):
        return np.unique(self.index.catalog.column("image_id").to_numpy())


class FlatSpace:
    """Exact search over given vectors, after an optional transform (a PCA, say)."""

    def __init__(self, ids: np.ndarray, raw: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self._transform = transform or (lambda x: x)
        self._ids = np.asarray(ids, dtype=np.int64)
        self.stored = np.ascontiguousarray(self.transform(raw), dtype=np.float32)
        self.flat = faiss.IndexIDMap(faiss.IndexFlatIP(self.stored.shape[1]))
        self.flat.add_with_ids(self.stored, self._ids)
        self._row = {int(i): r for r, i in enumerate(self._ids)}

    def transform(self, raw):
        return np.ascontiguousarray(self._transform(np.asarray(raw, dtype=np.float32)), dtype=np.float32)

    def vectors(self, ids):
        return self.stored[[self._row[int(i)] for i in ids]]

    def search(self, x, k):
        return self.flat.search(np.ascontiguousarray(x, dtype=np.float32), min(k, len(self._ids)))

    def ids(self):
        return self._ids


def sample_sources(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` distinct ids (all of them if fewer), sorted: the same sample for the same seed."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if n >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))


def indexed_sources(index, images_dir: str | os.PathLike, ids: np.ndarray) -> list[Source]:
    """The indexed file of each of ``ids`` (its first path in ``index``'s catalog), inside
    ``images_dir`` only."""
    from imgsim_assets.core.images import source_path

    found = []
    for image_id in np.asarray(ids).tolist():
        try:
            found.append(Source(int(image_id), source_path(images_dir, index.describe(int(image_id))[0]), Path(images_dir)))
        except ValueError:
            continue  # a path that would lead outside the images folder
    return found


def open_picture(source: Source) -> Image.Image:
    """The picture as a person sees it (EXIF orientation applied), RGB, at most MAX_SIDE; read
    as the pipeline reads files (a regular file inside the root, links out of it refused)."""
    from imgsim_assets.core.images import read_file

    data = read_file(source.path, source.root or source.path.parent)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))
        picture = ImageOps.exif_transpose(im).convert("RGB")
    picture.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
    return picture


@dataclass
class CopySet:
    """The embedded copies: one row per copy."""

    source: np.ndarray  # image_id of the picture copied
    family: np.ndarray  # edit family (str)
    vectors: np.ndarray  # raw embeddings
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (source or copy's source, why)
    embed_seconds: float = 0.0


def embed_copies(sources: Sequence[Source], families: Sequence[str], seed: int, embed: Embed,
                 scratch: str | os.PathLike | None = None) -> CopySet:
    """Write every source's copies (one per family) as files in a temporary folder under
    ``scratch``, a chunk of sources at a time, and embed them with ``embed``; the folder is
    removed. A source that cannot be opened, or a copy that is rejected, is listed in
    ``skipped`` with its reason."""
    for family in families:
        if family not in cp.FAMILIES:
            raise ValueError(f"unknown copy family {family!r}; choose from {', '.join(cp.FAMILIES)}")
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".copies.tmp-", dir=scratch))  # a killed run's is cleaned as stale
    out_source, out_family, out_vectors, skipped, seconds = [], [], [], [], 0.0
    try:
        for start in range(0, len(sources), CHUNK_SOURCES):
            written: list[tuple[str, int, str]] = []
            for source in sources[start : start + CHUNK_SOURCES]:
                try:
                    picture = open_picture(source)
                except Exception as e:  # noqa: BLE001 -- a file gone or unreadable since it was indexed
                    skipped.append((source.image_id, f"cannot open {source.path.name}: {e}"))
                    continue
                for family in families:
                    path = folder / f"{source.image_id}_{family}.jpg"
                    path.write_bytes(cp.make_copy(picture, family, cp.copy_rng(seed, source.image_id, family)))
                    written.append((str(path), source.image_id, family))
            if not written:
                continue
            began = time.perf_counter()
            records, vectors = embed([p for p, _, _ in written], str(folder))
            seconds += time.perf_counter() - began
            by_path = {p: (s, f) for p, s, f in written}
            for record in records:
                s, f = by_path[str(folder / record.path)]
                if record.status == "ok":
                    out_source.append(s)
                    out_family.append(f)
                else:
                    skipped.append((s, f"{f} copy rejected: {record.reason}"))
            out_vectors.append(vectors)
            for p, _, _ in written:
                os.unlink(p)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    dim = out_vectors[0].shape[1] if out_vectors else 0
    return CopySet(np.asarray(out_source, dtype=np.int64), np.asarray(out_family, dtype=object),
                   np.concatenate(out_vectors) if out_vectors else np.zeros((0, dim), np.float32), skipped, seconds)


@dataclass
class CopyScores:
    """Per copy: where its source ranked and what else scored how."""

    source: np.ndarray
    family: np.ndarray
    positive: np.ndarray  # score of the copy against its source
    rank: np.ndarray  # of the first right answer among labelled results (0: not in the top k)
    average_precision: np.ndarray
    nearest_negative: np.ndarray  # best non-copy's score (nan: none among the top k)
    negatives: np.ndarray  # every labelled non-copy score in the top k, all copies
    negative_of: np.ndarray  # the copy (row) each of ``negatives`` belongs to
    unlabelled: int  # results left out as possible duplicates the collection holds
    kth_score: np.ndarray  # the k-th score of each copy: non-copies above it are all counted
    source_vectors: np.ndarray  # in the space, one row per distinct source (order of ``source_ids``)
    source_ids: np.ndarray
    copy_vectors: np.ndarray  # in the space
    source_possible: np.ndarray  # per distinct source: the score from which an image may be its copy


def _collection_levels(space: Space, source_ids: np.ndarray, src: np.ndarray, seed: int,
                       sample: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Per source, from its scores with a seeded sample of the collection's images: the
    :data:`NULL_QUANTILE` (typical), and the score only the closest :data:`STANDS_OUT` share of the
    sample reaches, or its :data:`HELD_COPIES` closest in a small collection (stands out)."""
    others = np.random.default_rng(seed).permutation(space.ids())[: sample + len(source_ids)]
    scores = src @ space.vectors(others).T if len(others) else np.zeros((len(src), 0), np.float32)
    scores[others[None, :] == source_ids[:, None]] = np.nan  # not with itself
    if scores.shape[1] < 2:
        return np.full(len(src), -1.0), np.full(len(src), -1.0)
    typical = np.nan_to_num(np.nanquantile(scores, NULL_QUANTILE, axis=1), nan=-1.0)
    closest = max(HELD_COPIES, math.ceil((1 - STANDS_OUT) * scores.shape[1]))
    descending = -np.sort(-np.nan_to_num(scores, nan=-np.inf), axis=1)
    return typical, descending[:, min(closest, scores.shape[1] - 1)]


def possible_copy_scores(positive: np.ndarray, row_of: np.ndarray, stands_out: np.ndarray, sources: int) -> np.ndarray:
    """Per source, the score from which an image of the collection may be a copy of it: the
    lower quartile (:data:`POSSIBLE_COPY_QUANTILE`) of the scores of its copies that stand out of
    the collection (``positive > stands_out`` of their source); infinite where none does."""
    out = np.full(sources, np.inf, np.float32)
    recognisable = positive > stands_out[row_of]
    for r in np.unique(row_of[recognisable]):
        out[r] = np.quantile(positive[recognisable & (row_of == r)], POSSIBLE_COPY_QUANTILE)
    return out


def score_copies(copyset: CopySet, space: Space, k: int = _DEFAULTS.k, seed: int = _DEFAULTS.seed) -> CopyScores:
    """Search every copy and label what came back (see the module's description)."""
    q = space.transform(copyset.vectors)
    source_ids = np.unique(copyset.source)
    src = space.vectors(source_ids) if len(source_ids) else np.zeros((0, q.shape[1]), np.float32)
    row_of = np.searchsorted(source_ids, copyset.source)
    positive = np.einsum("ij,ij->i", q, src[row_of]) if len(q) else np.zeros(0, np.float32)
    median = np.array([np.median(positive[row_of == r]) for r in range(len(source_ids))], dtype=np.float32)
    self_score = np.einsum("ij,ij->i", src, src)
    typical, top = _collection_levels(space, source_ids, src, seed)
    # Only where a source's median copy is closer to it than most of the collection can an image
    # be taken for a copy (at least as close as a copy, or within TIE_EPSILON for the same
    # picture); otherwise the encoder cannot tell, and only the source is right (a model that
    # scores everything alike would else find every source first).
    distinct = median > typical
    possible = possible_copy_scores(positive, row_of, top, len(source_ids))
    n = len(q)
    rank = np.zeros(n, np.int64)
    ap = np.zeros(n, np.float64)
    nearest = np.full(n, np.nan, np.float32)
    kth = np.full(n, -np.inf, np.float32)
    negatives, negative_of, unlabelled = [], [], 0
    for lo in range(0, n, SCORE_ROWS):
        hi = min(lo + SCORE_ROWS, n)
        scores, ids = space.search(q[lo:hi], k)
        found = ids >= 0
        candidates = np.unique(ids[found])
        cand_vectors = space.vectors(candidates)
        for i in range(hi - lo):
            row = lo + i
            r = row_of[row]
            keep = found[i]
            ids_i, scores_i = ids[i][keep], scores[i][keep]
            if len(scores_i) == k:
                kth[row] = scores_i[-1]
            to_source = cand_vectors[np.searchsorted(candidates, ids_i)] @ src[r]
            right = (ids_i == source_ids[r]) | ((to_source >= self_score[r] - TIE_EPSILON) & distinct[r])
            junk = ~right & (to_source >= possible[r]) & distinct[r]
            unlabelled += int(junk.sum())
            labelled_right, labelled_scores = right[~junk], scores_i[~junk]
            hits = np.flatnonzero(labelled_right)
            if len(hits):
                rank[row] = hits[0] + 1
                ap[row] = _average_precision(labelled_right, relevant_total=max(int(right.sum()), 1))
            wrong = labelled_scores[~labelled_right]
            if len(wrong):
                nearest[row] = wrong[0]
            negatives.append(wrong)
            negative_of.append(np.full(len(wrong), row, np.int64))
    return CopyScores(
        source=copyset.source, family=copyset.family, positive=positive.astype(np.float32), rank=rank,
        average_precision=ap, nearest_negative=nearest,
        negatives=concat(negatives, np.float32), negative_of=concat(negative_of),
        unlabelled=unlabelled, kth_score=kth, source_vectors=src, source_ids=source_ids, copy_vectors=q,
        source_possible=possible,
    )


def _average_precision(is_right: np.ndarray, relevant_total: int) -> float:
    """AP of one ranked list, truncated at its length."""
    hits = np.flatnonzero(is_right)
    if not len(hits):
        return 0.0
    precision_at_hits = np.arange(1, len(hits) + 1) / (hits + 1)
    return float(precision_at_hits.sum() / relevant_total)


def precision_recall(positive: np.ndarray, negatives: np.ndarray, num_copies: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall) of "score ≥ t means same image", one point per distinct
    score, highest first: precision over the copy–source and copy–non-copy pairs at or above
    t, recall as the share of copies whose source is at or above t."""
    scores = np.concatenate((positive, negatives)).astype(np.float64)
    right = np.concatenate((np.ones(len(positive), bool), np.zeros(len(negatives), bool)))
    if not len(scores):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    scores, right = scores[order], right[order]
    tp, fp = np.cumsum(right), np.cumsum(~right)
    last = np.r_[scores[1:] != scores[:-1], True]  # end of each run of equal scores
    tp, fp, thresholds = tp[last], fp[last], scores[last]
    return thresholds, tp / (tp + fp), tp / max(num_copies, 1)


@dataclass(frozen=True)
class Threshold:
    value: float  # cosine similarity in the index's space
    precision: float
    recall: float
    reached: bool  # False: no threshold reaches the target; ``value`` is above every non-copy


def calibrate(positive: np.ndarray, negatives: np.ndarray, target: float) -> Threshold:
    """The lowest threshold whose precision reaches ``target``. If none does, one just above
    the best non-copy (precision 1 on these pairs, whatever recall is left)."""
    t, p, r = precision_recall(positive, negatives, len(positive))
    ok = np.flatnonzero(p >= target)
    if len(ok):
        i = ok[-1]
        return Threshold(float(t[i]), float(p[i]), float(r[i]), True)
    above = float(np.nextafter(np.float32(negatives.max() if len(negatives) else 1.0), np.float32(np.inf)))
    return Threshold(above, 1.0, float(np.mean(positive >= above)) if len(positive) else 0.0, False)


def held_out(scores: CopyScores, target: float, seed: int) -> tuple[float, float]:
    """(precision, recall) at thresholds calibrated on half the sources and applied to the
    other half, both ways round (two-fold cross-validation by source)."""
    fold = np.random.default_rng(seed).permutation(len(scores.source_ids)) % 2
    copy_fold = fold[np.searchsorted(scores.source_ids, scores.source)]
    negative_fold = copy_fold[scores.negative_of]
    tp = fp = 0
    for f in (0, 1):
        train = calibrate(scores.positive[copy_fold == f], scores.negatives[negative_fold == f], target)
        tp += int((scores.positive[copy_fold != f] >= train.value).sum())
        fp += int((scores.negatives[negative_fold != f] >= train.value).sum())
    return (tp / (tp + fp) if tp + fp else 1.0), tp / max(len(scores.positive), 1)


def _pairs_at_or_above(vectors: np.ndarray, threshold: float, block: int = 4096):
    """(i, j, score) with i < j for all rows of ``vectors`` scoring at least ``threshold``."""
    a, b, s = [], [], []
    for lo in range(0, len(vectors), block):
        sims = vectors[lo : lo + block] @ vectors.T
        i, j = np.nonzero(sims >= threshold)
        i = i + lo
        keep = i < j
        a.append(i[keep])
        b.append(j[keep])
        s.append(sims[i[keep] - lo, j[keep]])
    return concat(a), concat(b), concat(s, np.float32)


@dataclass(frozen=True)
class GroupingScore:
    rule: str
    purity: float
    completeness: float
    f1: float


def score_groupings(scores: CopyScores, threshold: float) -> list[GroupingScore]:
    """Each rule of :mod:`duplicates` on the sources and their copies, grouped at ``threshold``,
    scored by B-cubed against the planted groups. Sources that may be copies of each other (see
    :func:`possible_copy_scores`) count as one group, since the collection may hold them as copies."""
    items = np.concatenate((scores.source_vectors, scores.copy_vectors))
    truth = np.concatenate((np.arange(len(scores.source_ids)), np.searchsorted(scores.source_ids, scores.source)))
    # Sources that may be copies of each other: one planted group.
    bar = scores.source_possible
    sa, sb, ss = _pairs_at_or_above(scores.source_vectors, float(min(bar.min(initial=1.0), 1.0)))
    same = ss >= np.minimum(bar[sa], bar[sb])
    merged = duplicates.connected_groups(sa[same], sb[same])
    base = len(scores.source_ids)
    source_class = np.array([base + merged[i] if i in merged else i for i in range(base)], dtype=np.int64)
    truth = source_class[truth]
    a, b, s = _pairs_at_or_above(items, threshold)
    ids = np.arange(len(items))
    out = []
    for name, rule in duplicates.RULES.items():
        labels = duplicates.group_labels(ids, rule(a, b, s))
        purity, completeness = duplicates.bcubed(labels, truth)
        out.append(GroupingScore(name, purity, completeness, duplicates.f1(purity, completeness)))
    return out


@dataclass
class FamilyResult:
    family: str
    copies: int
    recall_at_1: float
    recall_at_10: float
    mean_average_precision: float
    median_copy_score: float
    median_nearest_non_copy: float


@dataclass
class CopyDetectionReport:
    """What :func:`evaluate` found, as stored (JSON) with the evaluation."""

    families: list[FamilyResult]
    overall: FamilyResult
    threshold: Threshold
    target_precision: float
    held_out_precision: float
    held_out_recall: float
    groupings: list[GroupingScore]
    grouping: str  # the rule that scored best
    curve: dict  # thresholds, precision, recall (thinned)
    histograms: dict  # copy scores vs nearest non-copy scores
    sources: int
    unlabelled: int
    complete_above: float  # non-copies are all counted above this score (the largest k-th score)
    skipped: list[tuple[int, str]]
    embed_ms_per_copy: float
    settings: dict
    random_weights: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CopyDetectionReport":
        d = dict(d)
        d["families"] = [FamilyResult(**f) for f in d["families"]]
        d["overall"] = FamilyResult(**d["overall"])
        d["threshold"] = Threshold(**d["threshold"])
        d["groupings"] = [GroupingScore(**g) for g in d["groupings"]]
        d["skipped"] = [tuple(s) for s in d["skipped"]]
        return cls(**d)

    def table(self) -> list[dict]:
        """One row per family, then ``all``: what the CLI prints and the web page shows."""
        return [asdict(f) for f in (*self.families, self.overall)]


def _family_result(name: str, scores: CopyScores, rows: np.ndarray) -> FamilyResult:
    rank = scores.rank[rows]
    near = scores.nearest_negative[rows]
    near = near[~np.isnan(near)]
    return FamilyResult(
        family=name, copies=int(len(rows)),
        recall_at_1=float(np.mean(rank == 1)) if len(rows) else 0.0,
        recall_at_10=float(np.mean((rank >= 1) & (rank <= 10))) if len(rows) else 0.0,
        mean_average_precision=float(np.mean(scores.average_precision[rows])) if len(rows) else 0.0,
        median_copy_score=float(np.median(scores.positive[rows])) if len(rows) else math.nan,
        median_nearest_non_copy=float(np.median(near)) if len(near) else math.nan,
    )


def _thin(t: np.ndarray, p: np.ndarray, r: np.ndarray, points: int = 200) -> dict:
    """At most ``points`` points of the curve, evenly spaced in recall (where it changes)."""
    steps = np.searchsorted(r, np.linspace(0, r[-1], points)) if len(t) else np.zeros(0, int)
    keep = np.unique(np.minimum(steps, len(t) - 1)) if len(t) else []
    return {"threshold": t[keep].round(6).tolist(), "precision": p[keep].round(6).tolist(),
            "recall": r[keep].round(6).tolist()}


def summarize(scores: CopyScores, target_precision: float, seed: int, settings: dict, skipped=(),
              embed_seconds: float = 0.0, random_weights: bool = False) -> CopyDetectionReport:
    families = [f for f in cp.FAMILIES if f in set(scores.family.tolist())]
    threshold = calibrate(scores.positive, scores.negatives, target_precision)
    precision, recall = held_out(scores, target_precision, seed)
    groupings = score_groupings(scores, threshold.value)
    t, p, r = precision_recall(scores.positive, scores.negatives, len(scores.positive))
    near = scores.nearest_negative[~np.isnan(scores.nearest_negative)]
    return CopyDetectionReport(
        families=[_family_result(f, scores, np.flatnonzero(scores.family == f)) for f in families],
        overall=_family_result("all", scores, np.arange(len(scores.positive))),
        threshold=threshold, target_precision=target_precision,
        held_out_precision=precision, held_out_recall=recall,
        groupings=groupings, grouping=max(groupings, key=lambda g: g.f1).rule,
        curve=_thin(t, p, r),
        histograms={"copy": scores.positive.round(5).tolist(), "nearest_non_copy": near.round(5).tolist()},
        sources=int(len(scores.source_ids)), unlabelled=int(scores.unlabelled),
        complete_above=float(scores.kth_score.max(initial=-1.0)),
        skipped=list(skipped),
        embed_ms_per_copy=1000 * embed_seconds / max(len(scores.positive), 1),
        settings=dict(settings), random_weights=random_weights,
    )


def detect_copies(sources: Sequence[Source], embed: Embed, space: Space, families: Sequence[str] = _DEFAULTS.families,
                  seed: int = _DEFAULTS.seed, target_precision: float = _DEFAULTS.duplicate_precision,
                  k: int = _DEFAULTS.k, scratch=None, random_weights: bool = False) -> CopyDetectionReport:
    """Copy, embed, search, score and summarize: the whole evaluation."""
    copyset = embed_copies(sources, families, seed, embed, scratch)
    if not len(copyset.source):
        raise ValueError("no copy could be made and embedded: "
                         + ("; ".join(r for _, r in copyset.skipped[:3]) or "no sources"))
    scores = score_copies(copyset, space, k, seed)
    settings = {"families": list(families), "seed": seed, "k": k, "sample_size": len(sources)}
    return summarize(scores, target_precision, seed, settings, copyset.skipped, copyset.embed_seconds, random_weights)
