"""Decode a large corpus of damaged files and count what happens to each.

    python -m bench.hostile [--variants 20000] [--seed 0]

Valid small files of every common format are truncated at random offsets or have random
bytes overwritten (anywhere, or within the header), then go through ``images.decode``.
The standard: every variant ends ``ok`` or ``rejected`` with a reason, none raises.
Prints the outcome counts, the exceptions that escaped (must be 0) and the decode rate.

    python -m bench.hostile --service [--before REV] [--images N]

attacks the search service instead (:mod:`bench.attacks`): each way a hostile client can
hurt it, measured on real server processes, before and after side by side.
"""

from __future__ import annotations

import argparse
import collections
import io
import time
import warnings

import numpy as np
from PIL import Image

from imgsim_assets.core import images
from imgsim_assets.core.images import metadata as md

FORMATS = {
    "jpeg": {"format": "JPEG", "quality": 90},
    "progressive-jpeg": {"format": "JPEG", "progressive": True},
    "png": {"format": "PNG"},
    "palette-png": {"format": "PNG", "mode": "P", "transparency": 0},
    "gif": {"format": "GIF", "mode": "P", "frames": 2},
    "webp": {"format": "WEBP", "quality": 80},
    "animated-webp": {"format": "WEBP", "frames": 2},
    "apng": {"format": "PNG", "frames": 2},
    "tiff": {"format": "TIFF", "compression": "tiff_lzw"},
    "bmp": {"format": "BMP"},
}


def _seed_files(rng: np.random.Generator) -> dict[str, bytes]:
    yy, xx = np.mgrid[0:60, 0:80]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1) + rng.integers(0, 40, (60, 80, 3))
    picture = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    exif[md.MAKE], exif[md.MODEL] = "Canon", "Canon EOS 5D Mark IV"  # damage reaches the photo metadata too
    exif.get_ifd(md.EXIF_IFD).update({md.DATETIME_ORIGINAL: "2021:06:15 14:30:05", md.OFFSET_TIME_ORIGINAL: "+02:00"})
    exif.get_ifd(md.GPS_IFD).update({md.GPS_LATITUDE_REF: "N", md.GPS_LATITUDE: (48, 51, 24),
                                     md.GPS_LONGITUDE_REF: "E", md.GPS_LONGITUDE: (2, 21, 3)})
    files = {}
    for name, spec in FORMATS.items():
        spec = dict(spec)
        fmt, mode, frames = spec.pop("format"), spec.pop("mode", "RGB"), spec.pop("frames", 1)
        im = picture.convert(mode)
        if frames > 1:
            spec.update(save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        if fmt in ("JPEG", "PNG", "WEBP"):
            spec["exif"] = exif.tobytes()
        buf = io.BytesIO()
        im.save(buf, format=fmt, **spec)
        files[name] = buf.getvalue()
    return files


def _mutate(data: bytes, rng: np.random.Generator, how: str) -> bytes:
    if how == "truncate":
        return data[: rng.integers(1, len(data))]
    out = bytearray(data)
    span = len(out) if how == "flip-anywhere" else min(len(out), 200)
    for _ in range(rng.integers(1, 8)):
        out[rng.integers(0, span)] = rng.integers(0, 256)
    return bytes(out)


def main(argv: list[str] | None = None) -> tuple[collections.Counter, collections.Counter]:
    """Returns the outcome counts (reason, or "ok") and the escaped exceptions."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--service", action="store_true", help="instead: attack `imgsim serve` (bench.attacks)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="with --service: attack this git revision's server too, side by side")
    parser.add_argument("--images", type=int, default=0, metavar="N",
                        help="with --service: serve N generated pictures instead of the sample corpus (quicker)")
    args = parser.parse_args(argv)
    if args.service:
        from bench import attacks

        attacks.run(args.before, args.images)
        return collections.Counter(), collections.Counter()

    rng = np.random.default_rng(args.seed)
    seeds = _seed_files(rng)
    pre = images.Preprocess(crop_size=56, resize_size=64)
    outcomes: collections.Counter = collections.Counter()
    escaped: collections.Counter = collections.Counter()
    dated = 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt metadata; the record says it
        for i in range(args.variants):
            name = list(seeds)[i % len(seeds)]
            how = ("truncate", "flip-anywhere", "flip-header")[(i // len(seeds)) % 3]
            record = images.ImageRecord(path=f"{name}-{i}")
            try:
                images.decode(_mutate(seeds[name], rng, how), pre, record)
            except Exception as e:  # noqa: BLE001 -- what this benchmark is counting
                escaped[f"{name}: {type(e).__name__}"] += 1
                continue
            outcomes[record.reason or "ok"] += 1
            dated += record.captured_at is not None
    seconds = time.perf_counter() - start

    print(f"{args.variants} damaged variants of {len(seeds)} formats ({', '.join(seeds)}), seed {args.seed}")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:<22} {count:>7}  ({count / args.variants:.1%})")
    print(f"  exceptions escaped     {sum(escaped.values()):>7}" + (f"  {dict(escaped)}" if escaped else ""))
    print(f"accounted for: {sum(outcomes.values()) / args.variants:.2%}   ({args.variants / seconds:,.0f} files/s)")
    print(f"ok files whose EXIF still gave a capture time: {dated} of {outcomes['ok']}")
    return outcomes, escaped


if __name__ == "__main__":
    main()
