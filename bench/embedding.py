"""The ``image_embeddings`` materialization vs a bare model loop over the same tensors.

    python -m bench.embedding [--images 500] [--model dinov2_vits14] [--batch-size 64] [--backend auto]
                              [--dtype auto]

Both sides embed the same pre-decoded 224×224 images with the same ViT (seeded random
weights, CPU) and the same backend and precision in one process: by default the product's,
``auto`` (on a CPU with native bf16, the fastest bf16 backend; else the fastest fp32 one). The
bare loop gets the uint8 pixels in memory and only calls the backend (normalisation and
``forward_features`` for torch, under the same autocast; the exported graph for onnxruntime
and openvino). The materialization is the
whole Dagster run of ``image_embeddings`` for one partition: model construction, reading
``cropped_tensors`` from Parquet, normalising, pooling and writing Parquet.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from dagster import AssetKey, DagsterInstance

from bench._common import header, ratio_line
from imgsim_assets.core import tables
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.resources import EncoderResource
from imgsim_assets.settings import Settings

TARGET = 1.15
BATCH = "bench"


def bare_loop(backend, batches: list[torch.Tensor]) -> float:
    """The backend alone (``core.backends.Backend``: normalisation and the model's forward pass)
    over uint8 batches in memory, in its precision."""
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=backend.dtype, enabled=backend.dtype != torch.float32):
        for x in batches:
            backend(x)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest of each side counts")
    parser.add_argument("--depth", type=int, default=None, help="blocks to build (default all; smoke tests)")
    parser.add_argument("--backend", default="auto", help="the encoder's backend (core.backends); the bare loop "
                        "calls the same backend directly")
    parser.add_argument("--dtype", default="auto", help="the encoder's precision (core.encoder.resolve_dtype)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        write_synthetic_batch(settings.images_dir / BATCH, args.images, seed=0, size=(240, 320))
        encoder = EncoderResource(model=args.model, weights="random", device="cpu", batch_size=args.batch_size,
                                  depth=args.depth, backend=args.backend, dtype=args.dtype)
        defs = build_definitions(settings, encoder=encoder)
        job = defs.resolve_implicit_global_asset_job_def()
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("image_batches", [BATCH])

        def materialize(*assets: str) -> float:
            start = time.perf_counter()
            result = job.execute_in_process(
                instance=instance, partition_key=BATCH, asset_selection=[AssetKey(a) for a in assets]
            )
            assert result.success
            return time.perf_counter() - start

        decode_s = materialize("raw_images", "cropped_tensors")
        tensors = tables.open_stream(settings.assets_dir / "cropped_tensors" / f"{BATCH}.parquet")
        batches = [torch.from_numpy(px.copy()) for _, px in tables.iter_tensor_batches(tensors, args.batch_size)]
        bare = encoder.load()
        bare.embed(np.zeros((1, 3, *batches[0].shape[-2:]), np.uint8))  # the backend built (auto: chosen)
        model = bare.backend
        n = sum(len(b) for b in batches)

        header(f"image_embeddings: {n} images, {args.model} at 224x224, batch {args.batch_size}, "
               f"CPU, {torch.get_num_threads()} torch threads, backend {model.name} "
               f"{str(model.dtype).removeprefix('torch.')}")
        print(f"  (decoding the batch beforehand, not compared: {decode_s:.1f} s)")
        bare_loop(model, batches[:1])  # warm-up
        bare, asset = [], []
        for _ in range(args.rounds):
            bare.append(bare_loop(model, batches))
            asset.append(materialize("image_embeddings"))
        ratio = min(asset) / min(bare)
        ratio_line(
            "materialization / bare loop (time)",
            f"materialization {min(asset):.1f} s ({n / min(asset):.1f} img/s)",
            f"bare loop {min(bare):.1f} s ({n / min(bare):.1f} img/s)",
            ratio, f"<= {TARGET}x", ratio <= TARGET,
        )
        print(f"  every round: bare {', '.join(f'{s:.1f}' for s in bare)} s; materialization "
              f"{', '.join(f'{s:.1f}' for s in asset)} s")


if __name__ == "__main__":
    os.environ.setdefault("DAGSTER_HOME", tempfile.mkdtemp(prefix="imgsim-bench-dagster-"))
    main()
