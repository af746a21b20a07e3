"""End-to-end throughput: JPEG files → embeddings, against the model alone on the same device.

    python -m bench.throughput [--device auto] [--models dinov2_vits14 dinov2_vitb14]
                               [--decode workers nvjpeg] [--images 2048] [--batch-size 256]

For each model: the model alone on uint8 tensors already on the device (the ceiling), then
files → vectors with each decoder: ``workers`` (imgsim's CPU pipeline: decode processes
with ``draft()`` feeding :meth:`Encoder.embed_files`) and ``nvjpeg`` (bytes read on the host,
``torchvision.io.decode_jpeg`` batched on the device, resize + center crop there).
On a GPU, bf16 autocast; on a CPU, fp32. Photos are generated (≥1 MP camera sizes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from bench._common import header, ratio_line, write_photos
from imgsim_assets.core.encoder import Encoder, EncoderSpec, prefetch
from imgsim_assets.core.images import Preprocess


def device_batches(paths: list[Path], pre: Preprocess, device: torch.device, batch_size: int, threads: int = 8):
    """uint8 N×3×H×W batches decoded with ``decode_jpeg`` on ``device`` (nvJPEG on CUDA)."""
    out_h, out_w = pre.output_size
    with concurrent.futures.ThreadPoolExecutor(threads) as readers:
        for i in range(0, len(paths), batch_size):
            data = list(readers.map(lambda p: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8),
                                    paths[i : i + batch_size]))
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            crops = []
            for im in decoded:
                new_w, new_h = pre.resized_size(im.shape[-1], im.shape[-2])
                im = TF.resize(im, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
                crops.append(TF.center_crop(im, [out_h, out_w]))
            yield torch.stack(crops)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["dinov2_vits14", "dinov2_vitb14"])
    parser.add_argument("--decode", nargs="+", default=["workers", "nvjpeg"], choices=["workers", "nvjpeg"])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=0, help="blocks to build (0 = all; smoke tests)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "imgsim-bench-photos")
    args = parser.parse_args(argv)

    unique = write_photos(args.dir, per_size=max(1, min(args.images, 48) // 3), sizes=((1280, 960), (2048, 1536), (4032, 3024)))
    paths = [unique[i % len(unique)] for i in range(args.images)]  # repeats are decoded again, like new files
    pre = Preprocess()
    results = {}
    for model in args.models:
        encoder = Encoder(EncoderSpec(model=model, weights="random", depth=args.depth or None),
                          device=args.device, batch_size=args.batch_size, compile=args.compile)
        device = encoder.device
        header(f"{model}: {len(paths)} JPEG photos at 224x224 on {device} ({str(encoder.dtype).removeprefix('torch.')})")
        pixels = torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8, device=device)
        encoder.embed(pixels)  # warm-up (and compilation)
        sync(device)
        start = time.perf_counter()
        for _ in range(0, len(paths), args.batch_size):
            encoder.embed(pixels)
        sync(device)
        ceiling = len(paths) / (time.perf_counter() - start)
        print(f"  model alone on uint8 tensors already on {device}: {ceiling:.0f} img/s")
        for decoder in args.decode:
            start = time.perf_counter()
            if decoder == "workers":
                n = sum(len(v) for _, v in encoder.embed_files(paths, pre, args.dir))
            else:
                n = sum(len(encoder.embed(b)) for b in prefetch(device_batches(paths, pre, device, args.batch_size)))
            sync(device)
            rate = n / (time.perf_counter() - start)
            results[(model, decoder)] = rate
            ratio_line(f"  files -> vectors, {decoder} decode", f"{rate:.0f} img/s", f"model alone {ceiling:.0f} img/s",
                       rate / ceiling)
    return results


if __name__ == "__main__":
    main()
