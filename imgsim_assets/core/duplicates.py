"""From similar pairs to duplicate groups, and how to tell a good grouping from a bad one.

Two rules turn the pairs at or above a threshold into groups:

- ``connected``: connected components of the pair graph. Every pair lands in one group, but
  one chain of pairs (A like B, B like C, ...) can join images that share nothing;
- ``representative``: the image with the most pairs starts a group of itself and every
  ungrouped image paired with it; repeat. Every member is itself at or above the threshold
  with its group's representative, so groups cannot chain.

Which one a collection gets is measured, not assumed: :func:`bcubed` scores a grouping against
known groups (the copies :mod:`evaluation` plants), and the evaluation keeps the better rule.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from imgsim_assets.core import index as ix

Grouping = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[int, int]]


def _numbered_by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0, 1, ... largest first (ties by first appearance)."""
    _, first, inverse, sizes = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    rank = np.empty(len(sizes), np.int64)
    rank[np.lexsort((first, -sizes))] = np.arange(len(sizes))
    return rank[inverse]


def connected_groups(a: np.ndarray, b: np.ndarray, sims: np.ndarray | None = None) -> dict[int, int]:
    """image_id → group for the connected components of the graph with edges ``a[i]–b[i]``;
    group 0 is the largest."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.union1d(a, b)
    if not len(nodes):
        return {}
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(len(ia)), (ia, ib)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    return dict(zip(nodes.tolist(), _numbered_by_size(labels).tolist()))


def representative_groups(a: np.ndarray, b: np.ndarray, sims: np.ndarray) -> dict[int, int]:
    """image_id → group, each group one representative and the ungrouped images paired with it.

    Representatives are taken by most pairs, then highest total similarity, then lowest id;
    an image whose partners were all grouped first stays out of every group. Group 0 is the
    largest.
    """
    nodes = np.union1d(a, b)
    if not len(nodes):
        return {}
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    ends = np.concatenate((ia, ib))
    partners = np.concatenate((ib, ia))
    weights = np.concatenate((sims, sims)).astype(np.float64)
    degree = np.bincount(ends, minlength=len(nodes))
    strength = np.bincount(ends, weights=weights, minlength=len(nodes))
    by_node = np.argsort(ends, kind="stable")
    starts = np.concatenate(([0], np.cumsum(degree)))
    group = np.full(len(nodes), -1, np.int64)
    for node in np.lexsort((nodes, -strength, -degree)):
        if group[node] >= 0:
            continue
        mine = partners[by_node[starts[node] : starts[node + 1]]]
        mine = mine[group[mine] < 0]
        if len(mine):
            group[node] = group[mine] = node
    grouped = group >= 0
    return dict(zip(nodes[grouped].tolist(), _numbered_by_size(group[grouped]).tolist()))


RULES: dict[str, Grouping] = {"representative": representative_groups, "connected": connected_groups}


def group_labels(items: np.ndarray, groups: dict[int, int]) -> np.ndarray:
    """One label per item: its group, or a label of its own when it is in none."""
    labels = np.array([groups.get(int(i), -1) for i in items], dtype=np.int64)
    alone = labels < 0
    labels[alone] = (labels.max(initial=-1) + 1) + np.arange(int(alone.sum()))
    return labels


def bcubed(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(purity, completeness) of a grouping, B-cubed: per item, the share of its group that is
    of its own true group, and the share of its true group that is in its group; averaged over
    items. Images in no group count as groups of one."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if not len(truth):
        return 1.0, 1.0
    _, pred = np.unique(predicted, return_inverse=True)
    _, true = np.unique(truth, return_inverse=True)
    both = pred * (true.max() + 1) + true
    _, cell, cell_size = np.unique(both, return_inverse=True, return_counts=True)
    overlap = cell_size[cell]
    purity = float(np.mean(overlap / np.bincount(pred)[pred]))
    completeness = float(np.mean(overlap / np.bincount(true)[true]))
    return purity, completeness


def f1(purity: float, completeness: float) -> float:
    return 0.0 if purity + completeness == 0 else 2 * purity * completeness / (purity + completeness)


def range_pairs(faiss_index, batches: set[str], threshold: float, chunk: int = 8192):
    """Every pair of distinct images at least ``threshold`` similar with one side in ``batches``,
    as (smaller id, larger id, similarity): a range search on faiss_index at its nprobe with the
    vectors it holds, so a pair scores the same whichever side finds it."""
    ids = faiss_index.ids_in_batches(sorted(batches)) if batches else np.zeros(0, np.int64)
    a, b, sims = [], [], []
    for start in range(0, len(ids), chunk):
        query_ids = ids[start : start + chunk]
        lims, scores, found = faiss_index.ivf.range_search(faiss_index.stored_vectors(query_ids), threshold)
        query = np.repeat(query_ids, np.diff(lims.astype(np.int64)))
        other = query != found  # never an image with itself
        a.append(np.minimum(query, found)[other])
        b.append(np.maximum(query, found)[other])
        sims.append(scores[other])
    return ix.concat(a, np.int64), ix.concat(b, np.int64), ix.concat(sims, np.float32)


def distinct_pairs(a: np.ndarray, b: np.ndarray, sims: np.ndarray, indexed: np.ndarray):
    """Each pair once (its highest similarity, when both sides found it), both images indexed."""
    keep = np.isin(a, indexed) & np.isin(b, indexed)
    a, b, sims = a[keep], b[keep], sims[keep]
    order = np.lexsort((-sims, b, a))
    a, b, sims = a[order], b[order], sims[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    return a[first], b[first], sims[first]
