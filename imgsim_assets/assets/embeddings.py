"""``cropped_tensors`` → ``image_embeddings``: DINOv2 vectors streamed to Parquet."""


import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import AssetExecutionContext, AssetIn, Failure, MetadataValue, asset

from imgsim_assets.core import tables
from imgsim_assets.io_managers import StagedFile
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import BATCH_RUNS, GPU_POOL, GPU_STEP_TAGS, TRANSIENT_RETRY
from imgsim_assets.resources import EncoderResource, StorageResource

PROGRESS_EVERY_S = 30.0


@asset(
    ins={"cropped_tensors": AssetIn(), "raw_images": AssetIn()},
    partitions_def=image_batches,
    io_manager_key="parquet_io_manager",
    group_name="ingest",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    backfill_policy=BATCH_RUNS,
    retry_policy=TRANSIENT_RETRY,
)
def image_embeddings(
    context: AssetExecutionContext,
    cropped_tensors: dict[str, pq.ParquetFile],
    raw_images: dict[str, pa.Table],
    encoder: EncoderResource,
    storage: StorageResource,
) -> dict[str, StagedFile]:
    """One L2-normalised DINOv2 vector per distinct image of the batch (Parquet: image_id, path,
    sha256, embedding). Every row names its model, weights, pooling and preprocessing; the
    file metadata holds the full settings. A run over several batches loads the model once."""
    try:
        model = encoder.load(progress=context.log.info)
    except (FileNotFoundError, ValueError) as e:  # no checkpoint, one that does not fit, a bad setting
        raise Failure(str(e), allow_retries=False) from e  # retrying cannot heal it
    except RuntimeError as e:  # Ray missing, no cluster at the address, actors that cannot load the model
        if not encoder.ray_address:
            raise
        raise Failure(str(e)) from e
    if model.random_weights:
        context.log.warning(
            "RANDOM WEIGHTS: no pretrained DINOv2 checkpoint is configured, so these vectors carry no "
            "learned meaning. Set IMGSIM_WEIGHTS (or the encoder's 'weights') to a checkpoint."
        )
    context.add_output_metadata(
        {
            "dim": model.spec.dim,
            "model": model.spec.model,
            "weights": "RANDOM (not pretrained)" if model.random_weights else model.weights_file,
            "weights_fingerprint": model.weights_fingerprint,
            "pooling": model.spec.pooling,
            "device": str(model.device),
            "compute": f"Ray at {encoder.ray_address}: {model.actors} encoder actor(s)" if encoder.ray_address
            else "this process",
            "dtype": str(model.dtype).removeprefix("torch."),
        }
    )
    staged = {}
    try:
        for batch in context.partition_keys:
            staged[batch], metadata = _embed_batch(context, batch, model, cropped_tensors[batch], raw_images[batch],
                                                   storage)
            context.add_asset_metadata(metadata, partition_key=batch)
    except RuntimeError as e:
        if encoder.ray_address:  # Ray gave up on a batch (its message says which and why)
            raise Failure(str(e)) from e
        raise
    finally:
        model.close()
    return staged


def _embed_batch(context: AssetExecutionContext, batch: str, model, cropped_tensors: pq.ParquetFile,
                 raw_images: pa.Table, storage: StorageResource) -> tuple[StagedFile, dict]:
    """One batch's pixels through the model into a staged Parquet file, and its metadata."""
    pre = tables.provenance_of(cropped_tensors.schema_arrow)
    provenance = {**model.provenance(), "preprocess": pre.get("preprocess", {})}
    first_path = _first_path_by_id(raw_images)
    total = cropped_tensors.metadata.num_rows
    staged = storage.staging_path(".parquet")
    schema = tables.embedding_schema(model.spec.dim, provenance)

    last_log = [time.perf_counter()]

    def progress(done: int, seconds: float) -> None:
        if time.perf_counter() - last_log[0] >= PROGRESS_EVERY_S or done == total:
            rate = done / max(seconds, 1e-9)
            context.log.info(f"{batch}: embedded {done}/{total} images, {rate:.1f} img/s, "
                             f"ETA {(total - done) / max(rate, 1e-9):.0f}s")
            last_log[0] = time.perf_counter()

    start, model_start = time.perf_counter(), model.model_seconds
    batches = tables.iter_tensor_batches(cropped_tensors, model.batch_size)
    with pq.ParquetWriter(staged, schema) as writer:
        for ids, vectors in model.embed_batches(batches, progress):
            try:
                check_finite(ids, vectors, model.dtype)
            except FloatingPointError as e:
                raise Failure(f"batch {batch}: {e}", allow_retries=False) from e  # rerunning gives the same numbers
            paths, digests = zip(*(first_path[i] for i in ids.tolist())) if len(ids) else ((), ())
            writer.write_table(tables.embedding_table(schema, ids, paths, digests, vectors))
    seconds = time.perf_counter() - start
    return StagedFile(staged), {
        "num_vectors": total,
        "embed_seconds": round(seconds, 3),
        "model_seconds": round(model.model_seconds - model_start, 3),
        "images_per_second": round(total / max(seconds, 1e-9), 1),
        "backend": _backend_name(model),
        "provenance": MetadataValue.json(provenance),
    }


def _backend_name(model) -> str:
    """Where the forward pass ran (the encoder's backend; auto's choice once made)."""
    backend = getattr(model, "backend", None)
    return backend.name if backend is not None else getattr(model, "backend_requested", "torch")


def check_finite(ids: np.ndarray, vectors: np.ndarray, dtype) -> None:
    """Refuse NaN or infinite vectors (a half-precision overflow): one would poison PCA and
    k-means for every batch, and dropping it would lose the image."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        shown = ", ".join(str(i) for i in ids[bad][:5].tolist())
        raise FloatingPointError(
            f"{int(bad.sum())} image(s) gave non-finite vectors (image_id {shown}{', ...' if bad.sum() > 5 else ''}) "
            f"computing in {str(dtype).removeprefix('torch.')}; set the encoder's dtype to bfloat16 or float32"
        )


def _first_path_by_id(manifest: pa.Table) -> dict[int, tuple[str, str]]:
    """image_id → (path, sha256) of its first file in the batch (duplicates share the id)."""
    out: dict[int, tuple[str, str]] = {}
    for image_id, path, digest, status in zip(
        *(manifest.column(c).to_pylist() for c in ("image_id", "path", "sha256", "status"))
    ):
        if status == "ok":
            out.setdefault(image_id, (path, digest))
    return out
