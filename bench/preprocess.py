"""Preprocessing of ≥1 MP JPEG photos: imgsim's decode vs a plain PIL + torchvision loop.

    python -m bench.preprocess [--per-size 12] [--dir /tmp/imgsim-bench-photos]

Baseline, per file: ``Image.open(path).convert("RGB")`` (full decode), then torchvision
``Resize(256, bicubic)``, ``CenterCrop(224)``, ``PILToTensor()``. imgsim, per file: read,
SHA-256, ``Image.draft()`` DCT-domain downscale, EXIF transpose, the same resize and crop
(:func:`imgsim_assets.core.images.preprocess_file`). Both run in one process on the same
files; then imgsim again with its decode worker processes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms

from bench._common import PHOTO_SIZES, best_of, header, ratio_line, write_photos
from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess

TARGET = 2.0


def plain_loop(paths: list[Path]) -> list:
    t = transforms.Compose(
        [transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
         transforms.CenterCrop(224), transforms.PILToTensor()]
    )
    return [t(Image.open(p).convert("RGB")) for p in paths]


def imgsim_loop(paths: list[Path], root: Path, workers: int = 1) -> list:
    return [px for _, px in images.preprocess_files(paths, root, Preprocess(), workers=workers, chunk=4)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-size", type=int, default=12, help="photos per resolution")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "imgsim-bench-photos")
    args = parser.parse_args(argv)

    paths = write_photos(args.dir, args.per_size)
    header(f"preprocessing {len(paths)} JPEG photos, {', '.join(f'{w}x{h}' for w, h in PHOTO_SIZES)}")
    plain_loop(paths[:2]), imgsim_loop(paths[:2], args.dir)  # warm the page cache and imports

    totals = {"plain": 0.0, "imgsim": 0.0}
    for w, h in PHOTO_SIZES:
        subset = [p for p in paths if f"_{w}x{h}_" in p.name]
        plain_s, plain_out = best_of(args.repeats, lambda: plain_loop(subset))
        ours_s, ours_out = best_of(args.repeats, lambda: imgsim_loop(subset, args.dir))
        totals["plain"] += plain_s
        totals["imgsim"] += ours_s
        # Same geometry as the baseline; pixels differ only by the DCT-domain downscale (and
        # by the EXIF rotation the baseline does not apply, so compare unrotated files).
        upright = [i for i, p in enumerate(subset) if int(p.stem[-3:]) % 4 != 3]
        diff = np.mean([np.abs(plain_out[i].numpy().astype(int) - ours_out[i].astype(int)).mean() for i in upright])
        ratio_line(
            f"  {w}x{h} ({w * h / 1e6:.1f} MP), 1 process",
            f"imgsim {len(subset) / ours_s:.1f} img/s",
            f"plain {len(subset) / plain_s:.1f} img/s",
            plain_s / ours_s, f">= {TARGET}x", plain_s / ours_s >= TARGET,
        )
        print(f"    mean |pixel difference| vs full decode: {diff:.2f} / 255")
    n = len(paths)
    ratio = totals["plain"] / totals["imgsim"]
    ratio_line(
        "all photos, 1 process", f"imgsim {n / totals['imgsim']:.1f} img/s", f"plain {n / totals['plain']:.1f} img/s",
        ratio, f">= {TARGET}x", ratio >= TARGET,
    )
    start_s, _ = best_of(1, lambda: imgsim_loop(paths[:64], args.dir, workers=0))  # starts the pool
    print(f"  starting the decode workers and a first pass over {min(len(paths), 64)} photos: {start_s:.1f} s")
    workers_s, _ = best_of(args.repeats, lambda: imgsim_loop(paths, args.dir, workers=0))
    ratio_line(
        "all photos, imgsim decode workers vs plain 1 process",
        f"imgsim {n / workers_s:.1f} img/s", f"plain {n / totals['plain']:.1f} img/s",
        totals["plain"] / workers_s,
    )


if __name__ == "__main__":
    main()
