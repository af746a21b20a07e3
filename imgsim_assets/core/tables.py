"""Arrow schemas and readers of the Parquet artifacts: manifests, pixel tensors, embeddings."""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PROVENANCE_KEY = b"imgsim"

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_id", pa.int64()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        # Photo metadata, null where the file does not say (and in manifests written before
        # these columns existed: read them with manifest_columns).
        ("captured_at", pa.timestamp("us")),  # the camera's local wall-clock time
        ("capture_offset", pa.string()),  # its UTC offset, "+02:00"
        ("camera_make", pa.string()),
        ("camera_model", pa.string()),
        ("pixels", pa.int64()),  # width × height, as displayed
        ("gps_latitude", pa.float64()),
        ("gps_longitude", pa.float64()),
        ("modified_at", pa.timestamp("us", tz="UTC")),  # the file's mtime when it was read
    ]
)
PHOTO_COLUMNS = ("captured_at", "capture_offset", "camera_make", "camera_model", "width", "height", "pixels",
                 "gps_latitude", "gps_longitude", "modified_at")


def manifest_columns(manifest: pq.ParquetFile | pa.Table, columns: Iterable[str]) -> pa.Table:
    """``columns`` of a ``raw_images`` manifest, typed as :data:`MANIFEST_SCHEMA` says; a column
    that an older manifest lacks is all null, but ``pixels`` is width × height wherever the
    manifest leaves it out or null and holds those (older manifests do)."""
    columns = list(columns)
    names = manifest.schema_arrow.names if isinstance(manifest, pq.ParquetFile) else manifest.schema.names
    present = [c for c in columns if c in names]
    size_known = "pixels" in columns and {"width", "height"} <= set(names)
    if size_known:
        present += [c for c in ("width", "height") if c not in present]
    table = manifest.read(columns=present) if isinstance(manifest, pq.ParquetFile) else manifest.select(present)
    out = {}
    for name in columns:
        kind = MANIFEST_SCHEMA.field(name).type
        out[name] = table[name].cast(kind) if name in names else pa.nulls(table.num_rows, kind)
    if size_known:
        area = pc.multiply(table["width"].cast(pa.int64()), table["height"].cast(pa.int64()))
        out["pixels"] = pc.coalesce(out["pixels"], area)
    return pa.table(out, schema=pa.schema([MANIFEST_SCHEMA.field(c) for c in columns]))


def with_provenance(schema: pa.Schema, provenance: dict) -> pa.Schema:
    return schema.with_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})


def provenance_of(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def tensor_schema(height: int, width: int, provenance: dict) -> pa.Schema:
    """``cropped_tensors``: one row per distinct image, pixels as uint8 3×H×W bytes."""
    schema = pa.schema([("image_id", pa.int64()), ("pixels", pa.binary(3 * height * width))])
    return with_provenance(schema, {**provenance, "height": height, "width": width})


def pixels_to_arrow(pixels: np.ndarray) -> pa.FixedSizeBinaryArray:
    n = len(pixels)
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(n, -1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(flat.shape[1]), n, [None, pa.py_buffer(flat)])


def arrow_to_pixels(column: pa.Array, height: int, width: int) -> np.ndarray:
    size = 3 * height * width
    buf = column.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=len(column) * size, offset=column.offset * size)
    return flat.reshape(len(column), 3, height, width)


def open_stream(path) -> pq.ParquetFile:
    """A Parquet file opened for reading row group by row group in bounded memory.

    (pyarrow's default ``pre_buffer`` caches every row group read until the file is closed,
    so streaming a large file would end up holding all of it.)
    """
    return pq.ParquetFile(path, pre_buffer=False)


def iter_tensor_batches(tensors: pq.ParquetFile, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(image_ids, pixels)`` from a ``cropped_tensors`` file without loading it whole."""
    meta = provenance_of(tensors.schema_arrow)
    h, w = meta["height"], meta["width"]
    for batch in tensors.iter_batches(batch_size=batch_size):
        pixels = batch.column("pixels")
        if pixels.null_count:
            raise ValueError("cropped_tensors holds null pixel rows")
        yield batch.column("image_id").to_numpy(), arrow_to_pixels(pixels, h, w)


# Stamped on every row of ``image_embeddings`` (dictionary-encoded: ~nothing on disk), so a
# vector keeps saying where it came from after files are concatenated or re-exported.
ROW_PROVENANCE = ("model", "weights", "pooling", "preprocess")
_LABEL = pa.dictionary(pa.int32(), pa.string())


def embedding_schema(dim: int, provenance: dict) -> pa.Schema:
    schema = pa.schema(
        [
            ("image_id", pa.int64()),
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            *((name, _LABEL) for name in ROW_PROVENANCE),
        ]
    )
    return with_provenance(schema, provenance)


def row_provenance(provenance: dict) -> dict[str, str]:
    """The short per-row labels for an encoder + preprocessing provenance dict."""
    pre = provenance.get("preprocess") or {}
    weights = str(provenance.get("weights_file", ""))
    return {
        "model": str(provenance.get("model", "")) + (f" depth={provenance['depth']}" if provenance.get("depth") else ""),
        "weights": weights if weights == "random" else weights.rsplit("/", 1)[-1],
        "pooling": str(provenance.get("pooling", "")),
        "preprocess": f"{pre.get('protocol', '')} {'x'.join(map(str, pre.get('output_size', [])))}".strip(),
    }


def embedding_table(schema: pa.Schema, image_ids, paths, digests, vectors: np.ndarray) -> pa.Table:
    """One batch of ``image_embeddings`` rows, provenance labels filled in from ``schema``."""
    n = len(image_ids)
    labels = row_provenance(provenance_of(schema))
    zeros = pa.array(np.zeros(n, dtype=np.int32))
    columns = {
        "image_id": pa.array(image_ids, pa.int64()),
        "path": pa.array(paths, pa.string()),
        "sha256": pa.array(digests, pa.string()),
        "embedding": embeddings_to_arrow(vectors),
        **{name: pa.DictionaryArray.from_arrays(zeros, pa.array([labels[name]])) for name in ROW_PROVENANCE},
    }
    return pa.table(columns, schema=schema)


def embeddings_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])


def embedding_matrix(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as a float32 N×D array."""
    column = table.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    if len(column) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


def iter_embeddings(files: Iterable[pq.ParquetFile], rows: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(image_ids, vectors)`` chunks over ``image_embeddings`` files, in bounded memory."""
    for f in files:
        for batch in f.iter_batches(batch_size=rows, columns=["image_id", "embedding"]):
            yield batch.column("image_id").to_numpy(), embedding_matrix(batch)


def sample_embeddings(files: dict[str, pq.ParquetFile], cap: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``cap`` ``(image_ids, vectors)`` drawn uniformly across files, in proportion to
    their sizes, reading one row group at a time."""
    total = sum(f.metadata.num_rows for f in files.values())
    if total == 0:
        raise ValueError("no embeddings to train on: every batch is empty or fully rejected")
    ids, parts = [], []
    for i, (_, f) in enumerate(sorted(files.items())):
        n = f.metadata.num_rows
        share = min(n, int(np.ceil(cap * n / total)))
        wanted = np.sort(np.random.default_rng(seed + i).choice(n, size=share, replace=False)) if share < n else np.arange(n)
        offset = 0
        for group in range(f.metadata.num_row_groups):
            size = f.metadata.row_group(group).num_rows
            local = wanted[(wanted >= offset) & (wanted < offset + size)] - offset
            if len(local):
                table = f.read_row_group(group, columns=["image_id", "embedding"]).take(pa.array(local))
                ids.append(table.column("image_id").to_numpy())
                parts.append(embedding_matrix(table))
            offset += size
    x, image_ids = np.concatenate(parts), np.concatenate(ids)
    if len(x) > cap:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), size=cap, replace=False))
        x, image_ids = x[keep], image_ids[keep]
    return image_ids, x


class TensorWriter:
    """Streams ``(image_id, pixels)`` rows into a ``cropped_tensors`` Parquet file, once per id."""

    def __init__(self, path, height: int, width: int, provenance: dict, rows_per_group: int = 64) -> None:
        self.schema = tensor_schema(height, width, provenance)
        self._writer = pq.ParquetWriter(path, self.schema, compression="none")
        self._rows_per_group = rows_per_group
        self._ids: list[int] = []
        self._pixels: list[np.ndarray] = []
        self.written: set[int] = set()

    def add(self, image_id: int, pixels: np.ndarray) -> bool:
        if image_id in self.written:
            return False
        self.written.add(image_id)
        self._ids.append(image_id)
        self._pixels.append(pixels)
        if len(self._ids) >= self._rows_per_group:
            self._flush()
        return True

    def _flush(self) -> None:
        if self._ids:
            columns = {"image_id": pa.array(self._ids, pa.int64()), "pixels": pixels_to_arrow(np.stack(self._pixels))}
            self._writer.write_table(pa.table(columns, schema=self.schema))
            self._ids, self._pixels = [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
