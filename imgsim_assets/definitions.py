"""The one Definitions object of the code location: wiring only."""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from imgsim_assets import jobs
from imgsim_assets.assets import analysis, embeddings, evaluation, folders, images, index, milvus, queries
from imgsim_assets.io_managers import (
    FaissIOManager,
    ImageIndexIOManager,
    JsonIOManager,
    NpyIOManager,
    NpzIOManager,
    ParquetIOManager,
)
from imgsim_assets.resources import (
    EncoderResource,
    MilvusResource,
    PreprocessResource,
    StorageResource,
    WatchResource,
)
from imgsim_assets.schedules import retrain_index
from imgsim_assets.sensors import new_image_batches
from imgsim_assets.settings import Settings


def build_definitions(
    settings: Settings,
    encoder: EncoderResource | None = None,
    preprocessing: PreprocessResource | None = None,
) -> Definitions:
    root = str(settings.assets_dir)
    return Definitions(
        executor=_executor(settings.executor),
        assets=load_assets_from_modules([folders, images, embeddings, index, evaluation, queries, analysis, milvus]),
        asset_checks=load_asset_checks_from_modules([index]),
        jobs=jobs.ALL_JOBS,
        sensors=[new_image_batches],
        schedules=[retrain_index],
        resources={
            "encoder": encoder or EncoderResource(model=settings.model, weights=settings.weights, device=settings.device,
                                                  ray_address=settings.ray_address, backend=settings.encoder_backend,
                                                  dtype=settings.encoder_dtype),
            "preprocessing": preprocessing or PreprocessResource(ray_address=settings.ray_address),
            "storage": StorageResource(data_dir=str(settings.data_dir), review_db=settings.review_db),
            "watch": WatchResource(),
            "milvus_db": MilvusResource(uri=settings.milvus_uri),
            "parquet_io_manager": ParquetIOManager(root=root),
            "npy_io_manager": NpyIOManager(root=root),
            "npz_io_manager": NpzIOManager(root=root),
            "json_io_manager": JsonIOManager(root=root),
            "faiss_io_manager": FaissIOManager(root=root),
            "image_index_io_manager": ImageIndexIOManager(root=root),
        },
    )


def _executor(name: str):
    """Dagster's default executor, or on Kubernetes one pod per step, so that only the GPU steps'
    pods ask for a GPU (their op tags, ``policies.GPU_STEP_TAGS``)."""
    if not name:
        return None
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # the [k8s] extra

        return k8s_job_executor
    raise ValueError(f"IMGSIM_EXECUTOR={name!r}: expected 'k8s' or nothing")


defs = build_definitions(Settings.from_env())
