"""One IO manager per file format. Writes are atomic; nothing is pickled.

Files live at ``<assets_dir>/<asset>/<partition>.<ext>`` (or ``<assets_dir>/<asset>.<ext>``
when unpartitioned). An asset that streams a large artifact writes it to a staging path
itself and returns :class:`StagedFile`; the IO manager then renames it into place.

A partitioned asset run for a range of partitions (one run for many batches) returns
``{partition: value}`` and the IO manager writes one file per partition; an input annotated
``dict[str, T]`` gets ``{partition: T}`` of the partitions the run reads.
"""

from __future__ import annotations

import json
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import ConfigurableIOManager, InputContext, MetadataValue, OutputContext

from imgsim_assets.core import tables
from imgsim_assets.core.evaluation import CopyDetectionReport
from imgsim_assets.core.index import PcaModel, Shard, ShardFile
from imgsim_assets.core.search import ImageIndex
from imgsim_assets.core.storage import (
    artifact_path,
    atomic_path,
    ensure_open_files,
    move_into_place,
    publish_dir,
    remove_stale_temporaries,
)


@dataclass(frozen=True)
class StagedFile:
    """A complete artifact already written at ``path``, to be moved into place."""

    path: Path


def _annotation(context: InputContext):
    return context.dagster_type.typing_type if context.dagster_type else None


def _value_type(context: InputContext):
    """The annotated type of an input, or of one value when it is ``dict[partition, value]``."""
    wanted = _annotation(context)
    if typing.get_origin(wanted) is dict:
        wanted = typing.get_args(wanted)[1]
    return wanted


class _FileIOManager(ConfigurableIOManager):
    root: str
    suffix: ClassVar[str] = ""

    def path_for(self, asset_key, partition_key: str | None) -> Path:
        return artifact_path(self.root, tuple(asset_key.path), partition_key, self.suffix)

    def _write(self, path: Path, obj: Any) -> None:
        raise NotImplementedError

    def _read(self, path: Path, context: InputContext) -> Any:
        raise NotImplementedError

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not context.has_asset_partitions:
            values = {None: obj}
        elif isinstance(obj, dict):
            values = obj
            if set(values) != set(context.asset_partition_keys):
                raise ValueError(f"{context.asset_key.to_user_string()} returned partitions {sorted(values)} for a run "
                                 f"of {sorted(context.asset_partition_keys)}")
        elif len(context.asset_partition_keys) == 1:
            values = {context.asset_partition_key: obj}
        else:
            raise TypeError(f"{context.asset_key.to_user_string()} ran for {len(context.asset_partition_keys)} "
                            "partitions: return {partition: value}")
        paths = []
        for partition, value in sorted(values.items(), key=lambda item: item[0] or ""):
            path = self.path_for(context.asset_key, partition)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)  # leftovers of writers killed long ago
            if isinstance(value, StagedFile):
                move_into_place(value.path, path)
            else:
                self._write(path, value)
            paths.append(path)
        shown = paths[0] if len(paths) == 1 else paths[0].parent
        context.add_output_metadata({"path": MetadataValue.path(str(shown))})

    def load_input(self, context: InputContext) -> Any:
        key = context.asset_key
        if not context.has_asset_partitions:
            return self._read(self.path_for(key, None), context)
        keys = context.asset_partition_keys
        if typing.get_origin(_annotation(context)) is not dict:
            if len(keys) != 1:
                raise TypeError(f"{len(keys)} partitions of {key.to_user_string()} are read: annotate the input "
                                "as dict[str, ...]")
            return self._read(self.path_for(key, keys[0]), context)
        # {partition: value}: the run's partitions, or every batch for an unpartitioned consumer.
        # Batches registered but not yet materialized are absent; consumers report them.
        found = {k: p for k, p in ((k, self.path_for(key, k)) for k in keys) if p.exists()}
        if _value_type(context) is pq.ParquetFile:
            ensure_open_files(len(found))  # each stays open, streamed
        return {k: self._read(p, context) for k, p in found.items()}


class ParquetIOManager(_FileIOManager):
    """DataFrames and Arrow tables as Parquet. Inputs typed ``pq.ParquetFile`` are opened lazily."""

    suffix: ClassVar[str] = ".parquet"

    def _write(self, path: Path, obj: Any) -> None:
        table = pa.Table.from_pandas(obj, preserve_index=False) if isinstance(obj, pd.DataFrame) else obj
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def _read(self, path: Path, context: InputContext) -> Any:
        wanted = _value_type(context)
        if wanted is pq.ParquetFile:
            return tables.open_stream(path)
        table = pq.read_table(path)
        return table.to_pandas() if wanted is pd.DataFrame else table


class NpyIOManager(_FileIOManager):
    """Arrays as ``.npy``, memory-mapped on load."""

    suffix: ClassVar[str] = ".npy"

    def _write(self, path: Path, obj: np.ndarray) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(obj), allow_pickle=False)

    def _read(self, path: Path, context: InputContext) -> np.ndarray:
        return np.load(path, mmap_mode="r", allow_pickle=False)


class NpzIOManager(_FileIOManager):
    """Objects made of plain arrays (``to_arrays``/``from_arrays``: :class:`PcaModel`,
    :class:`Shard`) as ``.npz``; the input's type annotation says which class to rebuild."""

    suffix: ClassVar[str] = ".npz"
    types: ClassVar[tuple[type, ...]] = (PcaModel, Shard, ShardFile)

    def _write(self, path: Path, obj) -> None:
        with atomic_path(path) as tmp:
            save_npz(tmp, obj)

    def _read(self, path: Path, context: InputContext):
        wanted = _value_type(context)
        if wanted not in self.types:
            raise TypeError(f"{context.asset_key.to_user_string()} is stored as .npz; annotate the input as one of "
                            f"{', '.join(t.__name__ for t in self.types)}, not {wanted!r}")
        if wanted is ShardFile:
            return ShardFile(str(path))  # read by its consumer, when it needs it
        with np.load(path, allow_pickle=False) as arrays:
            return wanted.from_arrays(arrays)


def save_npz(path: Path, obj) -> None:
    """``obj.to_arrays()`` as ``.npz`` at ``path`` (for an asset that stages its artifact itself)."""
    with open(path, "wb") as f:
        np.savez(f, **obj.to_arrays())


class JsonIOManager(_FileIOManager):
    """Objects with ``to_dict``/``from_dict`` (:class:`CopyDetectionReport`) as JSON; the input's type
    annotation says which class to rebuild."""

    suffix: ClassVar[str] = ".json"
    types: ClassVar[tuple[type, ...]] = (CopyDetectionReport,)

    def _write(self, path: Path, obj) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj.to_dict(), indent=1, allow_nan=True))

    def _read(self, path: Path, context: InputContext):
        wanted = _value_type(context)
        if wanted not in self.types:
            raise TypeError(f"{context.asset_key.to_user_string()} is stored as .json; annotate the input as one of "
                            f"{', '.join(t.__name__ for t in self.types)}, not {wanted!r}")
        return wanted.from_dict(json.loads(path.read_text()))


class FaissIOManager(_FileIOManager):
    """Faiss indexes in Faiss' own format."""

    suffix: ClassVar[str] = ".faiss"

    def _write(self, path: Path, obj: faiss.Index) -> None:
        with atomic_path(path) as tmp:
            faiss.write_index(obj, str(tmp))

    def _read(self, path: Path, context: InputContext) -> faiss.Index:
        return faiss.read_index(str(path))


class ImageIndexIOManager(_FileIOManager):
    """:class:`ImageIndex` as a directory (index, catalog, info) published behind a symlink.

    An index this process published is not loaded a second time while it is still in memory
    (an in-process run keeps its outputs until it ends): the checks of the run that built it
    read that object, not a second copy (a gigabyte at a million vectors). A published version
    directory never changes, so while the symlink points at it, it holds that same index.
    """

    _published: ClassVar[weakref.WeakValueDictionary[str, ImageIndex]] = weakref.WeakValueDictionary()

    def _write(self, path: Path, obj: ImageIndex) -> None:
        self._published[str(publish_dir(path, obj.save).resolve())] = obj

    def _read(self, path: Path, context: InputContext) -> ImageIndex:
        published = self._published.get(str(path.resolve()))
        return published if published is not None else ImageIndex.load(path)
