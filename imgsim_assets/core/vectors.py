"""Where the index chain reads embeddings from: a :class:`Collection` is the embeddings as
``image_embeddings`` Parquet files per batch (:class:`EmbeddingFiles`, what the assets read)
or as arrays in memory (:class:`Arrays`, what the benchmarks generate). Training samples it,
recall streams it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import pyarrow.parquet as pq

from imgsim_assets.core import tables
from imgsim_assets.core.index import sample_indices

Chunk = tuple[np.ndarray, np.ndarray]  # (image_ids, raw float32 vectors)


class Collection(Protocol):
    def __len__(self) -> int: ...

    def sample(self, cap: int, seed: int) -> Chunk:
        """Up to ``cap`` vectors drawn uniformly, the same ones for the same seed."""

    def chunks(self) -> Iterator[Chunk]:
        """Every vector once, in bounded memory."""


@dataclass(frozen=True)
class EmbeddingFiles:
    """``image_embeddings`` files by batch."""

    files: dict[str, pq.ParquetFile]

    def __len__(self) -> int:
        return sum(f.metadata.num_rows for f in self.files.values())

    def sample(self, cap: int, seed: int) -> Chunk:
        return tables.sample_embeddings(self.files, cap, seed)

    def chunks(self) -> Iterator[Chunk]:
        return tables.iter_embeddings([f for _, f in sorted(self.files.items())])


@dataclass(frozen=True)
class Arrays:
    """Vectors in memory under their ids."""

    ids: np.ndarray
    vectors: np.ndarray
    rows_per_chunk: int = 100_000

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, cap: int, seed: int) -> Chunk:
        rows = sample_indices(len(self.ids), cap, seed)
        return self.ids[rows], self.vectors[rows]

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, len(self.ids), self.rows_per_chunk):
            yield self.ids[start : start + self.rows_per_chunk], self.vectors[start : start + self.rows_per_chunk]
