"""Batch folder → manifest of every file (``raw_images``) and uint8 pixels (``cropped_tensors``).

One run may cover a range of batches (:data:`policies.BATCH_RUNS`): each is read on its own and
written to its own files, with its own metadata."""


import time

import pyarrow as pa
from dagster import AssetExecutionContext, AssetOut, Failure, MetadataValue, Output, multi_asset

from imgsim_assets.assets.folders import CONSUMED_KEY, batch_folders
from imgsim_assets.core import images, tables
from imgsim_assets.io_managers import StagedFile
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import BATCH_RUNS
from imgsim_assets.resources import PreprocessResource, StorageResource


@multi_asset(
    outs={
        "raw_images": AssetOut(
            io_manager_key="parquet_io_manager",
            kinds={"pillow", "parquet"},
            description="Manifest of every file in the batch folder: path (relative to the images root), "
            "content-addressed image_id, sha256, size, format, and status ok/rejected with the reason "
            "and the decoder's message; the photo's own metadata (EXIF capture time and UTC offset, camera "
            "make and model, GPS position; width, height and pixels as displayed; the file's mtime), null "
            "where the file does not say. Every file has exactly one row.",
        ),
        "cropped_tensors": AssetOut(
            io_manager_key="parquet_io_manager",
            kinds={"pillow", "parquet"},
            description="Each distinct image of the batch decoded, EXIF-rotated and cropped to uint8 3×H×W "
            "(DINOv2 eval protocol by default), one row per image_id.",
        ),
    },
    partitions_def=image_batches,
    backfill_policy=BATCH_RUNS,
    deps=[batch_folders],
    group_name="ingest",
)
def batch_images(context: AssetExecutionContext, storage: StorageResource, preprocessing: PreprocessResource):
    """Read, hash and decode every file of each batch folder of the run in a single pass."""
    manifests, tensors = {}, {}
    for batch in context.partition_keys:
        manifests[batch], tensors[batch], metadata = _read_batch(context, batch, storage, preprocessing)
        for name, values in metadata.items():
            context.add_asset_metadata(values, asset_key=name, partition_key=batch)
    yield Output(manifests, output_name="raw_images")
    yield Output(tensors, output_name="cropped_tensors")


def _preprocess_files(files, root, pre, preprocessing: PreprocessResource):
    """Each file's record and pixels, in order: decoded in local worker processes, or in Ray tasks."""
    if not preprocessing.ray_address:
        yield from images.preprocess_files(files, root, pre, workers=preprocessing.workers)
        return
    from imgsim_assets.core.distributed import preprocess_files_on_ray

    try:
        yield from preprocess_files_on_ray(files, root, pre, preprocessing.ray_address)
    except RuntimeError as e:  # Ray missing, no cluster at the address, or a chunk Ray gave up on
        raise Failure(str(e)) from e


def _read_batch(context: AssetExecutionContext, batch: str, storage: StorageResource,
                preprocessing: PreprocessResource) -> tuple[pa.Table, StagedFile, dict[str, dict]]:
    """One batch folder: its manifest, its staged pixels, and each asset's metadata."""
    folder = storage.batch_dir(batch)
    files = images.list_batch_files(folder)
    consumed = images.folder_fingerprint(files)  # before reading: a change made meanwhile shows as one
    pre = preprocessing.preprocess()
    height, width = pre.output_size
    staged = storage.staging_path(".parquet")

    records: list[images.ImageRecord] = []
    start = time.perf_counter()
    with tables.TensorWriter(staged, height, width, {"preprocess": pre.describe(), "batch": batch}) as writer:
        for record, pixels in _preprocess_files(files, storage.images_dir, pre, preprocessing):
            records.append(record)
            if pixels is not None:
                writer.add(record.image_id, pixels)
    seconds = time.perf_counter() - start

    manifest = pa.Table.from_pydict(images.records_to_columns(records), schema=tables.MANIFEST_SCHEMA)
    frame = manifest.to_pandas()
    rejected = frame[frame.status == images.REJECTED]
    for row in rejected.itertuples():
        context.log.warning(f"rejected {row.path}: {row.reason}: {row.message}")
    metadata = {
        "raw_images": {
            "num_files": len(frame),
            "num_ok": len(frame) - len(rejected),
            "num_rejected": len(rejected),
            "rejected": MetadataValue.md(
                rejected[["path", "reason", "message"]].to_markdown(index=False) if len(rejected) else "none"
            ),
            "with_capture_time": int(manifest["captured_at"].length() - manifest["captured_at"].null_count),
            "with_camera": int(manifest["camera_model"].length() - manifest["camera_model"].null_count),
            "with_gps": int(manifest["gps_latitude"].length() - manifest["gps_latitude"].null_count),
            "folder": MetadataValue.path(str(folder)),
            CONSUMED_KEY: consumed,
        },
        "cropped_tensors": {
            "num_images": len(writer.written),
            "image_size": f"{height}x{width}",
            "protocol": pre.protocol,
            "decode_seconds": round(seconds, 3),
            "decoded_by": f"Ray at {preprocessing.ray_address}" if preprocessing.ray_address else "this machine",
            "files_per_second": round(len(records) / max(seconds, 1e-9), 1),
        },
    }
    return manifest, StagedFile(staged), metadata
