"""Search as a library: the searchable artifact (a Faiss index whose ids are image_ids, plus the
catalog that names its images) and :class:`Searcher`, which holds an index and the encoder it
was built with, loaded once, and answers queries given as files, indexed image ids or vectors.
The CLI, the ``similar_images`` asset and the HTTP service only format what it returns.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsim_assets.core.filters import FILTER_COLUMNS, NO_PHOTO_METADATA, Filters, FilterUnavailable, PhotoColumns
from imgsim_assets.core.index import has_legacy_pretransform, set_parallel_mode
from imgsim_assets.core.recall import searched_space

INDEX_FILE = "index.faiss"
CATALOG_FILE = "catalog.parquet"
INFO_FILE = "index.json"

# A filtered search takes one of three ways (ImageIndex.search), chosen by the share of images
# the filter allows, as bench.serve measured them at 1M vectors. While the share is large, asking
# the index for more neighbours and keeping those that pass costs little more than an unfiltered
# search. A smaller share leaves too few allowed vectors in the lists a search visits: a Faiss id
# selector then skips the others before any distance is computed, and the search visits more
# lists the smaller the share (at 1% allowed, recall@10 0.78 at the tuned nprobe, 0.96 at 8×).
# The selector's hash lookups cost 2.6× an unfiltered search when half the vectors pass, so it
# is kept for small shares. A few thousand allowed vectors are compared exactly, every one; so
# are up to EXACT_KEPT_MAX once a filter is used again: reading their vectors takes longer than
# a search (about 1.5 µs each at 1M, scattered over the lists), so it happens in the background
# and the selector answers until they are read.
POST_FILTER_SHARE = 0.1  # at least this share allowed: filter the index's answers...
POST_FILTER_MARGIN = 2.0  # ... asking for this × k / share of them...
POST_FILTER_MAX = 1024  # ... unless that is more than this
SHARE_SAMPLE = 4096  # images on which a filter's share is estimated before any search
EXACT_MAX = 4096  # at most this many allowed images: exact search over their stored vectors
# With a selector, lists visited × POST_FILTER_SHARE / share, at most 8 times as many: at 1M
# vectors 8× holds recall@10 near 0.96 down to EXACT_MAX allowed (16× cost 2.2× an unfiltered
# search).
NPROBE_BOOST_MAX = 8
ALLOWED_KEPT = 16  # the allowed sets (ids, selector or vectors) of this many filters are kept
EXACT_KEPT_MAX = 16_384  # a filter used again with at most this many images: exact search once read
# A new narrow filter would pay for its selector (a hash insert per allowed image) or for reading
# its vectors (a hash lookup and a scattered read each) on its first query. Instead, a product-
# quantized copy of every indexed vector (d / 4 bytes each, in image_ids order: 64 MB at 1M and
# 256 dimensions) is built in the background once the index is loaded; a new filter of at most
# CODES_MAX images gathers their codes, scans them (about 30 ns a code) and re-ranks the best
# CODES_RERANK × k by their stored vectors (at 1M: recall@10 0.99 against exact search over
# the allowed images; codes of d / 8 bytes gave 0.92 at the same cost).
CODES_MIN_IMAGES = 50_000  # smaller indexes: reading the allowed vectors costs less than the codes
CODES_MAX = 16_384
CODES_RERANK = 8
CODES_TRAIN = 16_384  # vectors the quantizer is trained on


def similarity_score(inner_product: float) -> float:
    """The seed article's score: cosine similarity mapped from [-1, 1] to [0, 1]."""
    return (float(inner_product) + 1.0) / 2.0


@dataclass
class Hit:
    rank: int
    image_id: int = field(metadata={"format": "int64"})
    inner_product: float = field()
    score: float = field(metadata={"description": "(inner_product + 1) / 2"})
    path: str = field(metadata={"description": "relative to the images root"})
    batch: str = field()
    copies: int = field(default=1, metadata={"description": "files with these bytes"})

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Allowed:
    """The images a filter allows, and how a search is held to them."""

    ids: np.ndarray  # sorted image_ids
    share: float  # of the indexed images
    selector: faiss.IDSelector | None = None
    inner: faiss.IDSelector | None = None  # what ``selector`` negates: kept alive with it
    vectors: np.ndarray | None = None  # the stored vectors of ``ids``, for an exact search
    codes: np.ndarray | None = None  # the product-quantized codes of ``ids`` (rows of _Codes.table)
    reading: concurrent.futures.Future | None = None  # ``vectors`` being read in the background


@dataclass
class _Codes:
    """Every indexed image's vector as a product-quantizer code (d / 4 bytes: sub-vectors of 4
    dimensions, 256 centroids each), in image_ids order."""

    quantizer: faiss.ProductQuantizer
    table: np.ndarray  # images × code bytes, uint8

    @classmethod
    def build(cls, stored_vectors, image_ids: np.ndarray, d: int, chunk: int = 65_536) -> "_Codes":
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(image_ids), min(CODES_TRAIN, len(image_ids)), replace=False))
        quantizer = faiss.ProductQuantizer(d, d // 4, 8)
        quantizer.cp.niter = 10
        quantizer.train(np.ascontiguousarray(stored_vectors(image_ids[sample])))
        table = np.empty((len(image_ids), quantizer.code_size), dtype=np.uint8)
        for start in range(0, len(image_ids), chunk):
            table[start : start + chunk] = quantizer.compute_codes(stored_vectors(image_ids[start : start + chunk]))
        return cls(quantizer, table)

    def search(self, codes: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
        """Per query, the rows of ``codes`` (some of ``table``'s) with the ``k`` highest inner
        products by their codes, best first."""
        nq, k = len(queries), min(k, len(codes))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        codes = np.ascontiguousarray(codes)
        scores, rows = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
        heap = faiss.float_minheap_array_t()
        heap.nh, heap.k, heap.val, heap.ids = nq, k, faiss.swig_ptr(scores), faiss.swig_ptr(rows)
        self.quantizer.search_ip(faiss.swig_ptr(queries), nq, faiss.swig_ptr(codes), len(codes), heap, True)
        return rows


@dataclass
class ImageIndex:
    """Faiss index over raw embeddings (PCA inside), its catalog and how it was built."""

    index: faiss.Index
    # image_id, batch, path and the photo metadata (core.build.catalog_schema; indexes built before
    # it have the first three only): one row per file, several per duplicated image
    catalog: pa.Table
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = self.catalog.column("image_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        self._rows = order
        self._paths = self.catalog.column("path").to_pylist()
        batches = self.catalog.column("batch").combine_chunks().dictionary_encode()
        self.batch_names: list[str] = batches.dictionary.to_pylist()
        self._batch_set = frozenset(self.batch_names)
        self.has_photo_metadata = all(c in self.catalog.column_names for c in FILTER_COLUMNS)
        """Whether the catalog carries the columns photo filters read (indexes built before they
        were recorded do not)."""
        self._batch_codes = batches.indices.to_numpy(zero_copy_only=False)
        self._row_ids = ids
        starts = np.flatnonzero(np.r_[True, self._ids[1:] != self._ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        self.image_ids = self._ids[starts]  # each indexed image once, sorted
        self._first_rows = self._rows[starts]
        self._photo: PhotoColumns | None = None
        self._image_of_row: np.ndarray | None = None
        self._in_batches: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._allowed: dict[tuple, _Allowed] = {}
        self._sample: np.ndarray | None = None  # positions of the images a filter's share is estimated on
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None  # reads kept filters' vectors
        self._codes: _Codes | None = None  # every image's PQ code, for new narrow filters
        self._coding: concurrent.futures.Future | None = None  # ``_codes`` being built
        self._lock = threading.Lock()
        self._direct_map = False

    @property
    def num_vectors(self) -> int:
        return int(self.index.ntotal)

    @property
    def ivf(self) -> faiss.IndexIVF:
        return faiss.extract_index_ivf(self.index)

    def to_index_space(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw embeddings → the vectors the IVF stores (the index's own PCA + normalisation)."""
        transform = searched_space(self.index)[1]
        return transform(embeddings) if transform is not None else np.asarray(embeddings, dtype=np.float32)

    def describe(self, image_id: int) -> tuple[str, str, int]:
        """(first path, its batch, number of files) of an indexed image_id; empty if unknown."""
        lo, hi = np.searchsorted(self._ids, [image_id, image_id + 1])
        if lo == hi:
            return "", "", 0
        row = self._rows[lo]
        return self._paths[row], self.batch_names[self._batch_codes[row]], int(hi - lo)

    def ids_in_batches(self, batches: Sequence[str]) -> np.ndarray:
        """The image_ids with at least one file in one of ``batches``."""
        unknown = sorted(set(batches) - set(self.batch_names))
        if unknown:
            raise ValueError(f"no indexed batch named {', '.join(map(repr, unknown))}")
        codes = [self.batch_names.index(b) for b in batches]
        return np.unique(self._row_ids[np.isin(self._batch_codes, codes)])

    def batch_fingerprints(self) -> dict[str, str]:
        """Per batch, a fingerprint of the image_ids it holds: changes when the batch's content does."""
        order = np.lexsort((self._row_ids, self._batch_codes))
        codes, ids = self._batch_codes[order], self._row_ids[order]
        bounds = np.flatnonzero(np.diff(codes)) + 1
        return {self.batch_names[int(part_codes[0])]: hashlib.sha256(part_ids.tobytes()).hexdigest()[:16]
                for part_codes, part_ids in zip(np.split(codes, bounds), np.split(ids, bounds)) if len(part_codes)}

    def batch_sizes(self) -> dict[str, int]:
        """Files indexed per batch."""
        return dict(zip(self.batch_names, np.bincount(self._batch_codes, minlength=len(self.batch_names)).tolist()))

    def check(self, filters: Filters) -> None:
        """ValueError naming a batch that is not indexed; :class:`FilterUnavailable` for a photo
        filter on an index without photo metadata."""
        unknown = sorted(set(filters.batches) - self._batch_set)
        if unknown:
            raise ValueError(f"no indexed batch named {', '.join(map(repr, unknown))}")
        if filters.photo and not self.has_photo_metadata:
            raise FilterUnavailable(NO_PHOTO_METADATA)

    @property
    def photo(self) -> PhotoColumns:
        """The photo metadata per indexed image, in the order of ``image_ids`` (read once)."""
        with self._lock:
            if self._photo is None:
                self._photo = PhotoColumns(self.catalog, self._first_rows)
            return self._photo

    def passes(self, filters: Filters, images: np.ndarray | None = None, known: str | None = None) -> np.ndarray:
        """Which indexed images pass ``filters``: all of them (in the order of ``image_ids``),
        or those at positions ``images`` (known to pass the condition ``known``: ``batches``, or
        a photo condition as ``PhotoColumns.narrowest`` names it)."""
        keep = self.photo.mask(filters, images, known)
        if filters.batches and known != "batches":
            in_batches = self._images_in_batches(filters.batches)
            keep &= in_batches if images is None else in_batches[images]
        return keep

    def _images_in_batches(self, batches: Sequence[str]) -> np.ndarray:
        """Per indexed image, whether one of its files is in ``batches`` (kept per selection)."""
        return self._batch_selection(batches)[0]

    def _batch_selection(self, batches: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The images with a file in ``batches``: per image whether, and their positions (kept
        per selection)."""
        key = tuple(sorted(set(batches)))
        with self._lock:
            found = self._in_batches.get(key)
        if found is None:
            if self._image_of_row is None:
                self._image_of_row = np.searchsorted(self.image_ids, self._row_ids)
            codes = [self.batch_names.index(b) for b in key]
            inside = np.zeros(len(self.image_ids), dtype=bool)
            inside[self._image_of_row[np.isin(self._batch_codes, codes)]] = True
            found = (inside, np.flatnonzero(inside))
            with self._lock:
                if len(self._in_batches) >= 4 * ALLOWED_KEPT:
                    self._in_batches.clear()
                self._in_batches[key] = found
        return found

    def _allowed_positions(self, filters: Filters) -> np.ndarray:
        """The sorted positions (in ``image_ids``) of the images ``filters`` allow. A narrow
        filter starts from the few images its time range, camera or batches name, and tests the
        other conditions on those only."""
        start = self.photo.narrowest(filters)
        if filters.batches:
            inside, positions = self._batch_selection(filters.batches)
            if start is None or len(positions) < len(start[0]):
                start = positions, "batches"
        if start is None:
            return np.flatnonzero(self.passes(filters))
        positions, known = start
        positions = positions[self.passes(filters, positions, known)]
        return np.sort(positions, kind="stable")  # a merge of runs: a camera's or a batch's images are in order

    def allowed(self, filters: Filters) -> _Allowed:
        """The images ``filters`` allow, with the selector or the stored vectors a search over
        them needs; kept for the :data:`ALLOWED_KEPT` filters used last."""
        key = filters.key()
        with self._lock:
            found = self._allowed.pop(key, None)
            if found is not None:
                self._allowed[key] = found  # most recently used last
                if found.vectors is None and found.reading is None and len(found.ids) <= EXACT_KEPT_MAX:
                    found.reading = self._in_background(self._read_vectors, found)
                return found
        positions = self._allowed_positions(filters)
        ids = self.image_ids[positions]
        found = _Allowed(ids, len(ids) / max(len(self.image_ids), 1))
        codes = self._codes
        if codes is not None and 0 < len(ids) <= CODES_MAX:
            found.codes = np.take(codes.table, positions, axis=0)  # (indexing gathers rows 15× slower)
        elif len(ids) <= EXACT_MAX:
            found.vectors = self.stored_vectors(ids) if len(ids) else np.zeros((0, self.ivf.d), np.float32)
        elif len(ids) > len(self.image_ids) // 2:  # the smaller set is hashed: the ones left out
            left_out = np.ones(len(self.image_ids), dtype=bool)
            left_out[positions] = False
            found.inner = faiss.IDSelectorBatch(self.image_ids[left_out])
            found.selector = faiss.IDSelectorNot(found.inner)
        else:
            found.selector = faiss.IDSelectorBatch(ids)
        with self._lock:
            self._allowed[key] = found
            while len(self._allowed) > ALLOWED_KEPT:
                self._allowed.pop(next(iter(self._allowed)))
        return found

    def _read_vectors(self, allowed: _Allowed) -> None:
        allowed.vectors = self.stored_vectors(allowed.ids)  # one assignment: searches see none or all

    def prepare_filters(self) -> concurrent.futures.Future | None:
        """Start building, in the background, the codes new narrow filters are searched with
        (indexes of at least :data:`CODES_MIN_IMAGES` images whose dimension 4 divides); the
        build, or None when there is nothing to build. Searches use the codes once built."""
        with self._lock:
            if self._coding is None and len(self.image_ids) >= CODES_MIN_IMAGES and self.ivf.d % 4 == 0:
                self._coding = self._in_background(self._build_codes)
            return self._coding

    def _in_background(self, work, *args) -> concurrent.futures.Future:
        """``work(*args)`` on the index's one background thread (started on first use; the caller
        holds the lock)."""
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, "imgsim-filter-vectors")
        return self._reader.submit(work, *args)

    @property
    def filter_codes_bytes(self) -> int:
        """Memory the codes of :meth:`prepare_filters` take (0 before they are built)."""
        codes = self._codes
        return 0 if codes is None else int(codes.table.nbytes)

    def _build_codes(self) -> None:
        self._codes = _Codes.build(self.stored_vectors, self.image_ids, self.ivf.d)

    def _share(self, filters: Filters) -> float:
        """The share of indexed images ``filters`` allow, estimated on a fixed sample."""
        n = len(self.image_ids)
        if n <= SHARE_SAMPLE:
            return float(self.passes(filters).mean()) if n else 0.0
        if self._sample is None:
            self._sample = np.sort(np.random.default_rng(0).choice(n, SHARE_SAMPLE, replace=False))
        return float(self.passes(filters, self._sample).mean())

    def stored_vectors(self, image_ids: Sequence[int]) -> np.ndarray:
        """The vectors the index holds for ``image_ids`` (in its own space, decoded from their
        codes): what an indexed image is searched with. KeyError for an id not in the index."""
        wanted = np.asarray(image_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._ids, wanted), max(len(self._ids) - 1, 0))
        unknown = wanted[self._ids[pos] != wanted] if len(self._ids) else wanted
        if len(unknown):
            raise KeyError(int(unknown[0]))
        with self._lock:
            if not self._direct_map:  # id → list position, built once (about 16 bytes a vector)
                self.ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
                self._direct_map = True
        return self.ivf.reconstruct_batch(wanted)

    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, batches: Sequence[str] | None = None,
        in_index_space: bool = False, filters: Filters | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` neighbours of each query embedding (N×D, as produced by the encoder; or
        already in the index's space), optionally only among images of ``batches`` that pass
        ``filters``.

        A filter is held one of three ways, by the share of images it allows (estimated on a
        sample, then counted): a large share (``POST_FILTER_SHARE``) asks the index for
        2 × k / share neighbours and keeps the first k that pass, which is what a search
        restricted to them finds in the same lists (a query that keeps fewer is searched again
        the next way); up to ``EXACT_MAX`` allowed images are compared with the query, every
        one; between the two, a Faiss id selector restricts the search, which visits more lists
        the smaller the share, until the filter is used again and the vectors of its images (up
        to ``EXACT_KEPT_MAX``) have been read for exact search. Once :meth:`prepare_filters` has
        built every image's code, a new filter of at most ``CODES_MAX`` images is searched by its
        images' codes, the best re-ranked by their stored vectors, instead."""
        filters = (filters or Filters()).with_batches(batches)
        index = self.ivf if in_index_space else self.index
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != index.d:
            raise ValueError(f"query vectors have dimension {queries.shape[1]} but the index expects {index.d}")
        k = min(k, max(self.num_vectors, 1))
        set_parallel_mode(self.index, len(queries))
        if filters:
            self.check(filters)
            scores, ids = self._search_filtered(index, queries, k, int(nprobe or self.ivf.nprobe), filters,
                                                in_index_space)
        else:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe)) if nprobe else None
            scores, ids = index.search(queries, k, params=params)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for rank, (s, i) in enumerate(((s, i) for s, i in zip(row_scores, row_ids) if i >= 0), start=1):
                path, batch, copies = self.describe(int(i))
                hits.append(Hit(rank, int(i), float(s), similarity_score(s), path, batch, copies))
            results.append(hits)
        return results

    def strategy(self, filters: Filters, k: int = 10) -> str:
        """How a search for ``k`` neighbours is held to ``filters`` now: ``answers`` (the index's
        own, filtered), ``exact``, ``codes`` or ``selector`` (see :meth:`search`). Asking counts
        as a use."""
        if self._wide(filters, k) is not None:
            return "answers"
        allowed = self.allowed(filters)
        return "exact" if allowed.vectors is not None else "codes" if allowed.codes is not None else "selector"

    def _wide(self, filters: Filters, k: int) -> int | None:
        """How many of the index's answers to filter to keep ``k``; None: restrict the search."""
        share = self._share(filters)
        if share < POST_FILTER_SHARE:
            return None
        wide = min(int(np.ceil(POST_FILTER_MARGIN * k / share)) + k, self.num_vectors)
        return wide if wide <= POST_FILTER_MAX else None

    def _search_filtered(self, index: faiss.Index, queries: np.ndarray, k: int, nprobe: int, filters: Filters,
                         in_index_space: bool) -> tuple[np.ndarray, np.ndarray]:
        wide = self._wide(filters, k)
        if wide is None:
            return self._search_allowed(index, queries, k, nprobe, filters, in_index_space)
        scores, ids = index.search(queries, wide, params=faiss.SearchParametersIVF(nprobe=nprobe))
        flat = ids.ravel()
        pos = np.minimum(np.searchsorted(self.image_ids, flat), len(self.image_ids) - 1)
        passed = ((flat >= 0) & (self.image_ids[pos] == flat) & self.passes(filters, pos)).reshape(ids.shape)
        first = np.argsort(~passed, axis=1, kind="stable")[:, :k]  # the first k that pass, in order
        kept = np.take_along_axis(passed, first, axis=1)
        scores = np.where(kept, np.take_along_axis(scores, first, axis=1), -np.inf).astype(np.float32)
        ids = np.where(kept, np.take_along_axis(ids, first, axis=1), -1)
        short = np.flatnonzero(kept.sum(axis=1) < k)
        seen_all = wide >= self.num_vectors and nprobe >= self.ivf.nlist
        if len(short) and not seen_all:  # fewer passed among the candidates than were asked for
            scores[short], ids[short] = self._search_allowed(index, queries[short], k, nprobe, filters, in_index_space)
        return scores, ids

    def _search_allowed(self, index: faiss.Index, queries: np.ndarray, k: int, nprobe: int, filters: Filters,
                        in_index_space: bool) -> tuple[np.ndarray, np.ndarray]:
        allowed = self.allowed(filters)
        vectors = allowed.vectors  # once: a background read may set it meanwhile
        if vectors is None and allowed.codes is not None:
            return self._search_codes(allowed, queries if in_index_space else self.to_index_space(queries), k)
        if vectors is None:
            boost = min(max(POST_FILTER_SHARE / allowed.share, 1.0), NPROBE_BOOST_MAX)
            params = faiss.SearchParametersIVF(nprobe=min(int(np.ceil(nprobe * boost)), self.ivf.nlist),
                                               sel=allowed.selector)
            return index.search(queries, k, params=params)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        found = min(k, len(allowed.ids))
        if found:
            space = queries if in_index_space else self.to_index_space(queries)
            # A matrix product reads the vectors once for every query, on every core (the scan is
            # bound by memory: at 1M, 13,000 vectors took 0.9 ms in faiss.knn, 0.4 ms here).
            products = space @ vectors.T
            best = np.argpartition(-products, found - 1, axis=1)[:, :found]
            best = np.take_along_axis(best, np.argsort(-np.take_along_axis(products, best, 1), 1, kind="stable"), 1)
            scores[:, :found], ids[:, :found] = np.take_along_axis(products, best, 1), allowed.ids[best]
        return scores, ids

    def _search_codes(self, allowed: _Allowed, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of ``allowed`` by their codes' scores, re-ranked by the stored vectors
        of the best ``CODES_RERANK`` × k."""
        found = min(k, len(allowed.ids))
        candidates = self._codes.search(allowed.codes, queries, CODES_RERANK * k)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (query, near) in enumerate(zip(queries, candidates)):
            near = allowed.ids[near[near >= 0]]
            products = self.stored_vectors(near) @ query
            best = np.argsort(-products, kind="stable")[:found]
            scores[row, : len(best)], ids[row, : len(best)] = products[best], near[best]
        return scores, ids

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        pq.write_table(self.catalog, directory / CATALOG_FILE)
        (directory / INFO_FILE).write_text(json.dumps(self.info, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> "ImageIndex":
        directory = Path(directory)
        if not (directory / INDEX_FILE).is_file():
            raise FileNotFoundError(f"no index at {directory}; materialize faiss_index first (imgsim ingest)")
        index = faiss.read_index(str(directory / INDEX_FILE))
        if has_legacy_pretransform(index):
            warnings.warn(f"the index at {directory} folds its PCA mean into a bias, which loses query precision "
                          "on embeddings close to their mean; rebuild it (imgsim ingest --retrain)", stacklevel=2)
        return cls(index=index, catalog=pq.read_table(directory / CATALOG_FILE),
                   info=json.loads((directory / INFO_FILE).read_text()))


def preprocess_from_info(info: dict):
    """The preprocessing the indexed images went through, so queries get the same."""
    from imgsim_assets.core.images import Preprocess

    pre = dict(info.get("encoder", {}).get("preprocess") or {})
    pre.pop("output_size", None)
    if "grid_size" in pre:
        pre["grid_size"] = tuple(pre["grid_size"])
    return Preprocess(**pre)


def encoder_from_info(info: dict, device: str = "auto", dtype: str = "auto", progress=None, backend: str = "torch"):
    """The encoder the index was built with (model, weights, pooling, depth). Weights recorded
    as a file that is not on this machine are looked up (or fetched) as ``auto``: their
    fingerprint, checked by :func:`check_query_encoder`, says whether they are the same."""
    from imgsim_assets.core.encoder import Encoder, EncoderSpec

    enc = info.get("encoder", {})
    weights_file = enc["weights_file"]
    if weights_file != "random" and enc.get("weights_fingerprint") and not Path(weights_file).exists():
        weights_file = "auto"
    spec = EncoderSpec(model=enc["model"], weights=weights_file, pooling=enc["pooling"], depth=enc.get("depth"))
    return Encoder(spec, device=device, dtype=dtype, progress=progress, backend=backend)


class EncoderMismatch(ValueError):
    """Queries would be encoded with other weights than the index's vectors."""


def check_query_encoder(index_encoder: dict, query_encoder: dict) -> None:
    """EncoderMismatch unless queries encoded by ``query_encoder`` are comparable with the
    index's vectors (indexes that predate weights fingerprints are compared by file)."""
    from imgsim_assets.core.encoder import describe_encoder, same_encoder

    if not same_encoder(index_encoder, query_encoder):
        raise EncoderMismatch(
            f"this index was built with {describe_encoder(index_encoder)}, but queries here would be encoded with "
            f"{describe_encoder(query_encoder)}: their vectors are not comparable. Provide the weights the index "
            f"was built with (IMGSIM_WEIGHTS, or the Hugging Face cache), rebuild the index with these "
            f"(imgsim ingest --retrain), or search anyway with --allow-other-weights."
        )


def embed_files(paths, encoder, pre, root=None, workers: int = 1, box=None):
    """Embed image files as queries: (records, vectors of the ok ones in order); only ``box``
    of each (an ``images.Box``) when given."""
    paths = [os.path.abspath(p) for p in paths]
    root = root or os.path.commonpath([os.path.dirname(p) for p in paths] or ["."])
    if box is not None:  # queries cut to a box are few: decoded here, not in worker processes
        from imgsim_assets.core import images

        decoded = [images.preprocess_file(p, root, pre, box) for p in paths]
        pixels = [px for _, px in decoded if px is not None]
        vectors = encoder.embed(np.stack(pixels)) if pixels else np.zeros((0, encoder.spec.dim), np.float32)
        return [r for r, _ in decoded], vectors
    records, vectors = [], []
    for batch_records, batch_vectors in encoder.embed_files(paths, pre, root, workers=workers):
        records.extend(batch_records)
        vectors.append(batch_vectors)
    return records, (np.concatenate(vectors) if vectors else np.zeros((0, encoder.spec.dim), np.float32))


@dataclass
class Answer:
    """The neighbours of one query file; ``hits`` is empty when the file was rejected (``record``
    says why)."""

    query: str
    record: object  # images.ImageRecord
    hits: list[Hit]

    @property
    def ok(self) -> bool:
        return self.record.status == "ok"


class UnknownImage(KeyError):
    """An image_id that is not in the index."""

    def __str__(self) -> str:
        return f"image_id {self.args[0]} is not in the index"


class Searcher:
    """Queries as files, image ids or vectors, embedded with the encoder and preprocessing the
    index was built with (never whatever the environment says now), so queries and index agree.

    The encoder is loaded on first use and kept. Subclasses provide the vector store:
    :class:`FaissSearcher` (the materialized ``faiss_index``) and :class:`MilvusSearcher`.
    """

    def __init__(self, encoder_info: dict, device: str = "auto", dtype: str = "auto", workers: int = 1,
                 allow_other_weights: bool = False, backend: str = "torch") -> None:
        self.encoder_info = dict(encoder_info)
        self.device, self.dtype, self.workers, self.backend = device, dtype, workers, backend
        self.allow_other_weights = allow_other_weights  # search even when the query encoder differs
        self._encoder = None
        self._encoder_lock = threading.Lock()

    @property
    def num_vectors(self) -> int:
        raise NotImplementedError

    def search(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None,
               batches: Sequence[str] | None = None, filters: Filters | None = None) -> list[list[Hit]]:
        """Top-``k`` neighbours of each raw embedding (N×D), optionally only within ``batches``
        and among images that pass ``filters``."""
        raise NotImplementedError

    def vectors_of(self, image_ids: Sequence[int]) -> np.ndarray:
        """The stored raw embeddings of indexed images, in order; :class:`UnknownImage` if one is not indexed."""
        raise NotImplementedError

    def describe(self, image_id: int) -> tuple[str, str, int]:
        """(first path, its batch, number of files) of an indexed image; empty if unknown."""
        raise NotImplementedError

    @property
    def info(self) -> dict:
        """How the searched vectors were built (the index's ``info``; at least the encoder)."""
        return {"encoder": self.encoder_info}

    def batch_sizes(self) -> dict[str, int]:
        """Images indexed per batch."""
        raise NotImplementedError

    def check_filters(self, filters: Filters) -> None:
        """ValueError naming any of the filters' batches that holds no indexed image, and
        :class:`FilterUnavailable` for a filter this store cannot apply (checked before a query
        costs any model work)."""
        unknown = sorted(set(filters.batches) - set(self.batch_sizes()))
        if unknown:
            raise ValueError(f"no indexed batch named {', '.join(map(repr, unknown))}")

    def check_batches(self, batches: Sequence[str]) -> None:
        """:meth:`check_filters` for a batch selection alone."""
        self.check_filters(Filters(batches=tuple(batches)))

    def warm(self, previous: "Searcher | None" = None) -> None:
        """Be ready for the first query now: the encoder loaded (taken over from ``previous`` when
        it serves the same model)."""
        if previous is not None and previous.encoder_info == self.encoder_info and previous._encoder is not None:
            self._encoder = previous._encoder
            return
        # One blank image through the model: its backend built (auto measured) before any query waits.
        self.encoder.embed(np.zeros((1, 3, *self.preprocess.output_size), dtype=np.uint8))

    @property
    def random_weights(self) -> bool:
        return self.encoder_info.get("weights_file") == "random"

    @property
    def encoder(self):
        with self._encoder_lock:
            if self._encoder is None:
                encoder = encoder_from_info({"encoder": self.encoder_info}, device=self.device, dtype=self.dtype,
                                            backend=self.backend)
                if not self.allow_other_weights:
                    check_query_encoder(self.encoder_info, {**encoder.provenance(), "preprocess":
                                                            self.encoder_info.get("preprocess")})
                self._encoder = encoder
            return self._encoder

    @property
    def query_encoder(self) -> dict:
        """The encoder queries are embedded with here (model, weights fingerprint, dtype...), loaded
        if need be; ``encoder_info`` is the one the index was built with."""
        return self.encoder.provenance()

    @property
    def preprocess(self):
        return preprocess_from_info({"encoder": self.encoder_info})

    def search_files(self, paths: Sequence[str | os.PathLike], k: int = 10, nprobe: int | None = None,
                     batches: Sequence[str] | None = None, root: str | os.PathLike | None = None,
                     filters: Filters | None = None, box=None) -> list[Answer]:
        """One :class:`Answer` per file, in order; a file that cannot be decoded is answered with
        its rejection, not an exception. With ``box`` (an ``images.Box`` in the pixels of the
        upright picture) only that region of each file is the query; ``images.BadBox`` when it
        leaves too little of one."""
        self.check_filters((filters or Filters()).with_batches(batches))  # before the model is loaded
        records, vectors = embed_files(list(paths), self.encoder, self.preprocess, root=root, workers=self.workers,
                                       box=box)
        found = iter(self.search(vectors, k, nprobe, batches, filters) if len(vectors) else [])
        return [Answer(r.path, r, next(found) if r.status == "ok" else []) for r in records]

    def search_ids(self, image_ids: Sequence[int], k: int = 10, nprobe: int | None = None,
                   batches: Sequence[str] | None = None, filters: Filters | None = None) -> list[list[Hit]]:
        """Neighbours of indexed images (each is its own first neighbour unless filtered out)."""
        return self.search(self.vectors_of(image_ids), k, nprobe, batches, filters)

    def decode_upload(self, data: bytes, name: str = "upload", max_decode_bytes: int | None = None, box=None):
        """An image given as bytes → (its record, uint8 pixels or None when rejected), preprocessed
        as the index's images were (only ``box`` of it, an ``images.Box``, when given), within
        ``max_decode_bytes`` of decoded pixels when given. Never raises for a bad image; raises
        ``images.BadBox`` for a box that leaves too little of it."""
        from dataclasses import replace

        from imgsim_assets.core import images

        pre = self.preprocess
        if max_decode_bytes is not None:
            pre = replace(pre, max_decode_bytes=min(pre.max_decode_bytes, max_decode_bytes))
        record = images.ImageRecord(path=name)
        if len(data) > pre.max_file_bytes:
            record.reject(images.Rejected(images.TOO_LARGE, f"{len(data)} bytes exceeds {pre.max_file_bytes}"))
            return record, None
        record.sha256 = hashlib.sha256(data).hexdigest()
        record.image_id, record.bytes = images.image_id_from_sha256(record.sha256), len(data)
        return record, images.decode(data, pre, record, box)

    def to_searched_space(self, vectors: np.ndarray) -> np.ndarray:
        """Raw embeddings → the vectors whose inner products search ranks by."""
        return vectors

    def compare(self, first, second):
        """Why two pictures match (``compare.Picture``s, preprocessed as the index's images were):
        a ``compare.PatchComparison``, each patch paired with its best match in the other."""
        from imgsim_assets.core import compare

        return compare.compare(self.encoder, self.preprocess, first, second, self.to_searched_space)

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocessed images (uint8 3×H×W each) → raw embeddings, in one model call."""
        if not len(pixels):
            return np.zeros((0, int(self.encoder_info.get("dim") or self.encoder.spec.dim)), np.float32)
        return self.encoder.embed(np.stack(pixels))


class FaissSearcher(Searcher):
    """The materialized ``faiss_index`` and its catalog; raw vectors of indexed images are read
    from their batch's ``image_embeddings``."""

    def __init__(self, index: ImageIndex, embeddings_dir: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__(index.info.get("encoder", {}), **kwargs)
        self.index = index
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None

    @classmethod
    def open(cls, assets_dir: str | os.PathLike, **kwargs) -> "FaissSearcher":
        """The index the pipeline last published under ``assets_dir``."""
        from imgsim_assets.core.storage import artifact_path

        index = ImageIndex.load(artifact_path(assets_dir, "faiss_index"))
        return cls(index, artifact_path(assets_dir, "image_embeddings"), **kwargs)

    @property
    def info(self) -> dict:
        return self.index.info

    @property
    def num_vectors(self) -> int:
        return self.index.num_vectors

    def search(self, vectors, k=10, nprobe=None, batches=None, filters=None):
        return self.index.search(vectors, k, nprobe=nprobe, batches=batches, filters=filters)

    def to_searched_space(self, vectors):
        return self.index.to_index_space(vectors)

    def search_ids(self, image_ids, k=10, nprobe=None, batches=None, filters=None):
        """Neighbours of indexed images, searched with the vectors the index holds for them (no
        file is read: milliseconds on a large index)."""
        try:
            stored = self.index.stored_vectors(image_ids)
        except KeyError as e:
            raise UnknownImage(e.args[0]) from None
        return self.index.search(stored, k, nprobe=nprobe, batches=batches, in_index_space=True, filters=filters)

    def describe(self, image_id: int) -> tuple[str, str, int]:
        return self.index.describe(image_id)

    def batch_sizes(self) -> dict[str, int]:
        return self.index.batch_sizes()

    def check_filters(self, filters: Filters) -> None:
        self.index.check(filters)

    def warm(self, previous: Searcher | None = None) -> None:
        super().warm(previous)
        self.index.stored_vectors([])  # and the id → vector map
        if self.index.has_photo_metadata:
            self.index.photo  # noqa: B018 -- and the photo columns filters read
        if self.index.has_photo_metadata or len(self.index.batch_names) > 1:
            self.index.prepare_filters()  # in the background: the codes new narrow filters use

    def vectors_of(self, image_ids):
        from imgsim_assets.core import tables

        if self.embeddings_dir is None:
            raise ValueError("this searcher has no image_embeddings to look indexed images up in")
        by_batch: dict[str, list[int]] = {}
        for image_id in image_ids:
            _, batch, copies = self.describe(int(image_id))
            if not copies:
                raise UnknownImage(int(image_id))
            by_batch.setdefault(batch, []).append(int(image_id))
        found: dict[int, np.ndarray] = {}
        for batch, ids in by_batch.items():
            rows = pq.read_table(self.embeddings_dir / f"{batch}.parquet", columns=["image_id", "embedding"],
                                 filters=[("image_id", "in", ids)])
            found.update(zip(rows.column("image_id").to_pylist(), tables.embedding_matrix(rows)))
        missing = [i for i in image_ids if int(i) not in found]
        if missing:
            raise UnknownImage(int(missing[0]))
        return np.stack([found[int(i)] for i in image_ids]).astype(np.float32)


class MilvusSearcher(Searcher):
    """A Milvus collection filled by ``milvus_collection`` (a Milvus Lite file or a server).

    ``consistency``: the searches' Milvus consistency level; Bounded by default (writes of the last
    few seconds may not be seen yet), Strong to see every acknowledged write at a time tick's cost."""

    def __init__(self, client, collection: str, consistency: str | None = None, **kwargs) -> None:
        from imgsim_assets.core import milvus

        if not client.has_collection(collection):
            raise FileNotFoundError(f"Milvus has no collection {collection!r}; materialize milvus_collection first "
                                    "(imgsim ingest --milvus)")
        super().__init__(milvus.provenance(client, collection), **kwargs)
        self.client, self.collection = client, collection
        self.consistency = consistency or milvus.SEARCH_CONSISTENCY

    @property
    def num_vectors(self) -> int:
        from imgsim_assets.core import milvus

        return milvus.count(self.client, self.collection)

    def check_filters(self, filters: Filters) -> None:
        if filters.photo:
            raise FilterUnavailable("the Milvus collection holds no photo metadata: filter by capture time, camera or "
                                    "size with the faiss index (--backend faiss), or by batch here")
        super().check_filters(filters)

    def search(self, vectors, k=10, nprobe=None, batches=None, filters=None):
        from imgsim_assets.core import milvus

        filters = (filters or Filters()).with_batches(batches)
        if filters.photo:
            self.check_filters(filters)
        batches = filters.batches
        answers = milvus.search(self.client, self.collection, vectors, k, batches=list(batches) if batches else None,
                                consistency=self.consistency)
        return [[Hit(rank, h["image_id"], h["inner_product"], similarity_score(h["inner_product"]), h["path"], h["batch"])
                 for rank, h in enumerate(rows, start=1)] for rows in answers]

    def describe(self, image_id: int) -> tuple[str, str, int]:
        from imgsim_assets.core import milvus

        rows = milvus.get(self.client, self.collection, [image_id], ["batch", "path"])
        return (rows[0]["path"], rows[0]["batch"], 1) if rows else ("", "", 0)

    def batch_sizes(self) -> dict[str, int]:
        from imgsim_assets.core import milvus

        return milvus.batch_sizes(self.client, self.collection)

    def vectors_of(self, image_ids):
        from imgsim_assets.core import milvus

        rows = {int(r["image_id"]): r["embedding"] for r in milvus.get(self.client, self.collection, image_ids, ["embedding"])}
        for i in image_ids:
            if int(i) not in rows:
                raise UnknownImage(int(i))
        return np.asarray([rows[int(i)] for i in image_ids], dtype=np.float32)
