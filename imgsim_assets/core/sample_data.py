"""A small, real sample corpus: scikit-image's bundled photographs plus near-duplicate variants.

Batch 1 holds the originals, batch 2 edited copies (crops, resizes, flips), and a separate
query folder holds JPEG re-encodes that are in no batch, so a search for one of them should
find its original first. Each edited copy carries the EXIF of a made-up camera and capture
time (:data:`CAMERAS`), so that search filters have something to filter.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from imgsim_assets.core.images import metadata as md
from imgsim_assets.core.storage import DataLayout, atomic_path

# Photographs and scans that ship inside scikit-image (no download needed).
SKIMAGE_NAMES = (
    "astronaut", "brick", "camera", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "stereo_motorcycle", "text",
)


def _skimage_pictures() -> dict[str, Image.Image]:
    from skimage import data

    pictures = {}
    for name in SKIMAGE_NAMES:
        picture = getattr(data, name)()
        a = np.asarray(picture[0] if isinstance(picture, tuple) else picture)
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
        im = Image.fromarray(a)
        pictures[name] = im
    return pictures


def _save(im: Image.Image, path: Path, **kwargs) -> None:
    buf = io.BytesIO()
    im.save(buf, **kwargs)
    data = buf.getvalue()
    if path.is_file() and path.read_bytes() == data:
        return  # unchanged: keep the mtime, so the batch does not look modified
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# Per kind of edit: the camera its copies say they were taken with, and the year. Copy number i
# (in SKIMAGE_NAMES' order) was taken at noon on day i + 1 of month i mod 12 + 1, at UTC+01:00.
CAMERAS = {"crop": ("Canon", "Canon EOS 5D Mark IV", 2019), "small": ("NIKON CORPORATION", "NIKON D750", 2020),
           "flip": ("Apple", "iPhone 12", 2021)}


def capture_time(kind: str, i: int) -> datetime:
    """When the ``kind`` copy of picture number ``i`` says it was taken (camera-local time)."""
    return datetime(CAMERAS[kind][2], i % 12 + 1, i + 1, 12)


def _exif(kind: str, i: int) -> bytes:
    exif = Image.Exif()
    exif[md.MAKE], exif[md.MODEL] = CAMERAS[kind][:2]
    exif.get_ifd(md.EXIF_IFD).update({md.DATETIME_ORIGINAL: capture_time(kind, i).strftime("%Y:%m:%d %H:%M:%S"),
                                      md.OFFSET_TIME_ORIGINAL: "+01:00"})
    return exif.tobytes()


def _variants(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    return {
        "crop": im.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
        "small": im.resize((max(w // 2, 32), max(h // 2, 32)), Image.BICUBIC),
        "flip": ImageOps.mirror(im),
    }


def write_sample_corpus(data_dir: str | Path, batches: tuple[str, str] = ("batch-0001", "batch-0002")) -> dict[str, Path]:
    """Write the sample corpus under ``data_dir``; idempotent (same files, same bytes)."""
    data_dir = Path(data_dir)
    originals, edits = (DataLayout(data_dir).images / b for b in batches)
    queries = data_dir / "queries"
    for i, (name, im) in enumerate(_skimage_pictures().items()):
        _save(im, originals / f"{name}.png", format="PNG")
        for kind, variant in _variants(im).items():
            _save(variant.convert("RGB"), edits / f"{name}_{kind}.jpg", format="JPEG", quality=90, exif=_exif(kind, i))
        _save(im.convert("RGB"), queries / f"{name}_reencoded.jpg", format="JPEG", quality=60)
    for folder in (originals, edits):
        (folder / "_SUCCESS").touch()
    return {"originals": originals, "edits": edits, "queries": queries}


def write_synthetic_batch(folder: str | Path, n: int, seed: int, size: tuple[int, int] = (96, 128)) -> list[Path]:
    """``n`` distinct synthetic pictures (smooth colour fields with shapes), for tests."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        base = rng.uniform(0, 255, size=3)
        grad = rng.uniform(-1.5, 1.5, size=(3, 2))
        img = base[:, None, None] + grad[:, 0, None, None] * yy + grad[:, 1, None, None] * xx
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, min(h, w) / 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[:, disc] = rng.uniform(0, 255, size=(3, 1))
        img = np.clip(img + rng.normal(0, 6, size=img.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        path = folder / f"img_{seed:03d}_{i:04d}.png"
        _save(Image.fromarray(img), path, format="PNG")
        paths.append(path)
    return paths
