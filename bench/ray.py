"""``image_embeddings`` in this process vs on a local Ray cluster, over the same images.

    python -m bench.ray [--images 2000] [--model dinov2_vits14] [--depth 2] [--batch-size 64]

Both sides are the whole Dagster materialization of ``image_embeddings`` for one partition
(reading ``cropped_tensors``, the model, writing Parquet), with seeded random weights on the
CPU. The Ray side starts a one-node cluster of real processes on loopback (``ray start``, all
the machine's CPUs) and runs the model in one encoder actor with as many threads as this
process's torch; the pixels travel through Ray's object store. Rounds alternate; the fastest of
each side counts. Goal: Ray on one machine within 1.15× of the local time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from dagster import AssetKey, DagsterInstance

from bench._common import header, ratio_line
from imgsim_assets.core import tables
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

TARGET = 1.15
BATCH = "bench"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--depth", type=int, default=2, help="blocks to build (the tiny encoder: 2)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    from imgsim_assets.core.distributed import connect
    from imgsim_assets_tests.ray_cluster import RayCluster

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        write_synthetic_batch(settings.images_dir / BATCH, args.images, seed=0, size=(240, 320))
        preprocessing = PreprocessResource(crop_size=args.crop, resize_size=args.crop * 8 // 7)
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("image_batches", [BATCH])
        cluster = RayCluster(nodes=1, cpus=os.cpu_count() or 1)
        started = time.perf_counter()
        address = cluster.start()
        connect(address)
        cluster_s = time.perf_counter() - started
        try:
            def materialize(ray_address: str, *assets: str) -> float:
                encoder = EncoderResource(model=args.model, weights="random", device="cpu", depth=args.depth,
                                          batch_size=args.batch_size, ray_address=ray_address,
                                          ray_actors=1 if ray_address else 0)
                job = build_definitions(settings, encoder=encoder, preprocessing=preprocessing) \
                    .resolve_implicit_global_asset_job_def()
                start = time.perf_counter()
                result = job.execute_in_process(instance=instance, partition_key=BATCH,
                                                asset_selection=[AssetKey(a) for a in assets])
                assert result.success
                return time.perf_counter() - start

            decode_s = materialize("", "raw_images", "cropped_tensors")
            header(f"image_embeddings: {args.images} images, {args.model} ({args.depth or 'all'} blocks) at "
                   f"{args.crop}x{args.crop}, batch {args.batch_size}, CPU, {torch.get_num_threads()} torch threads")
            print(f"  (decoding beforehand, not compared: {decode_s:.1f} s; the Ray cluster came up in {cluster_s:.1f} s)")
            local, remote = [], []
            for _ in range(args.rounds):
                local.append(materialize("", "image_embeddings"))
                local_vectors = _vectors(settings)
                remote.append(materialize(address, "image_embeddings"))
                ray_vectors = _vectors(settings)
            diff = float(np.abs(local_vectors - ray_vectors).max())
            ratio = min(remote) / min(local)
            ratio_line("Ray / this process (time)", f"Ray {min(remote):.1f} s ({args.images / min(remote):.1f} img/s)",
                       f"this process {min(local):.1f} s ({args.images / min(local):.1f} img/s)",
                       ratio, f"<= {TARGET}x", ratio <= TARGET)
            print(f"  every round: this process {', '.join(f'{s:.1f}' for s in local)} s; Ray "
                  f"{', '.join(f'{s:.1f}' for s in remote)} s; max abs difference of the vectors {diff:.2e}")
        finally:
            import ray

            ray.shutdown()
            cluster.stop()


def _vectors(settings: Settings) -> np.ndarray:
    return tables.embedding_matrix(pq.read_table(settings.assets_dir / "image_embeddings" / f"{BATCH}.parquet"))


if __name__ == "__main__":
    os.environ.setdefault("DAGSTER_HOME", tempfile.mkdtemp(prefix="imgsim-bench-dagster-"))
    main()
