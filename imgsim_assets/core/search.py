"""The searchable artifact: a Faiss index (ids = image_id) plus the catalog that names its images."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsim_assets.core.recall import set_parallel_mode

INDEX_FILE = "index.faiss"
CATALOG_FILE = "catalog.parquet"
INFO_FILE = "index.json"


def similarity_score(inner_product: float) -> float:
    """The seed article's score: cosine similarity mapped from [-1, 1] to [0, 1]."""
    return (float(inner_product) + 1.0) / 2.0


@dataclass
class Hit:
    rank: int
    image_id: int
    inner_product: float
    score: float
    path: str
    batch: str
    copies: int = 1

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ImageIndex:
    """Faiss index over raw embeddings (PCA inside), its catalog and how it was built."""

    index: faiss.Index
    catalog: pa.Table  # image_id, batch, path: one row per file, several per duplicated image
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = self.catalog.column("image_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        self._rows = order
        self._paths = self.catalog.column("path").to_pylist()
        self._batches = self.catalog.column("batch").to_pylist()
        self._row_ids = ids

    @property
    def num_vectors(self) -> int:
        return int(self.index.ntotal)

    @property
    def ivf(self) -> faiss.IndexIVF:
        return faiss.extract_index_ivf(self.index)

    def to_index_space(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw embeddings → the vectors the IVF stores (the index's own PCA + normalisation)."""
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        chain = faiss.downcast_index(self.index).chain
        for i in range(chain.size()):
            x = chain.at(i).apply(x)
        return x

    def describe(self, image_id: int) -> tuple[str, str, int]:
        """(first path, its batch, number of files) of an indexed image_id; empty if unknown."""
        lo, hi = np.searchsorted(self._ids, [image_id, image_id + 1])
        if lo == hi:
            return "", "", 0
        row = self._rows[lo]
        return self._paths[row], self._batches[row], int(hi - lo)

    def ids_in_batches(self, batches: list[str]) -> np.ndarray:
        """The image_ids with at least one file in one of ``batches``."""
        unknown = sorted(set(batches) - set(self._batches))
        if unknown:
            raise ValueError(f"no indexed batch named {', '.join(map(repr, unknown))}")
        return np.unique(self._row_ids[np.isin(np.asarray(self._batches, dtype=object), batches)])

    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, batches: list[str] | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` neighbours of each query embedding (N×D, as produced by the encoder),
        optionally only among images of ``batches``."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query vectors have dimension {queries.shape[1]} but the index expects {self.index.d}")
        params = None
        if nprobe or batches:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.ivf.nprobe))
            if batches:
                selector = faiss.IDSelectorBatch(self.ids_in_batches(batches))
                params.sel = selector
        set_parallel_mode(self.index, len(queries))
        scores, ids = self.index.search(queries, min(k, max(self.num_vectors, 1)), params=params)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for rank, (s, i) in enumerate(((s, i) for s, i in zip(row_scores, row_ids) if i >= 0), start=1):
                path, batch, copies = self.describe(int(i))
                hits.append(Hit(rank, int(i), float(s), similarity_score(s), path, batch, copies))
            results.append(hits)
        return results

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
        return cls(
            index=faiss.read_index(str(directory / INDEX_FILE)),
            catalog=pq.read_table(directory / CATALOG_FILE),
            info=json.loads((directory / INFO_FILE).read_text()),
        )


def preprocess_from_info(info: dict):
    """The preprocessing the indexed images went through, so queries get the same."""
    from imgsim_assets.core.images import Preprocess

    pre = dict(info.get("encoder", {}).get("preprocess") or {})
    pre.pop("output_size", None)
    if "grid_size" in pre:
        pre["grid_size"] = tuple(pre["grid_size"])
    return Preprocess(**pre)


def encoder_from_info(info: dict, device: str = "auto", dtype: str = "auto"):
    """The encoder the index was built with (model, weights file, pooling, depth)."""
    from imgsim_assets.core.encoder import Encoder, EncoderSpec

    enc = info.get("encoder", {})
    spec = EncoderSpec(model=enc["model"], weights=enc["weights_file"], pooling=enc["pooling"], depth=enc.get("depth"))
    return Encoder(spec, device=device, dtype=dtype)


def embed_files(paths, encoder, pre, root=None, workers: int = 1):
    """Embed image files as queries: (records, vectors of the ok ones in order)."""
    paths = [os.path.abspath(p) for p in paths]
    root = root or os.path.commonpath([os.path.dirname(p) for p in paths] or ["."])
    records, vectors = [], []
    for batch_records, batch_vectors in encoder.embed_files(paths, pre, root, workers=workers):
        records.extend(batch_records)
        vectors.append(batch_vectors)
    return records, (np.concatenate(vectors) if vectors else np.zeros((0, encoder.spec.dim), np.float32))
