"""Edited copies of an image, as copy-detection benchmarks make them (Copydays, DISC 2021):
one family per kind of edit, each drawing its strength from a seeded generator, and ``combo``
chaining two or three of them. Every copy is saved as a JPEG file, as such copies travel.

Adding a family is one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

SAVE_QUALITY = 95  # JPEG quality of every copy whose family does not set its own


@dataclass(frozen=True)
class Family:
    """One kind of edit: ``edit(image, rng) -> (image, jpeg_quality or None)``."""

    edit: Callable[[Image.Image, np.random.Generator], tuple[Image.Image, int | None]]
    description: str


def _jpeg(im, rng):
    return im, int(rng.integers(10, 76))


def _resize(im, rng):
    f = rng.uniform(0.25, 0.5)
    return im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.BICUBIC), None


def _crop(im, rng):
    area = rng.uniform(0.5, 0.9)
    aspect = math.exp(rng.uniform(-0.25, 0.25))  # the kept box's shape, relative to the image's
    w = min(im.width, max(8, round(im.width * math.sqrt(area * aspect))))
    h = min(im.height, max(8, round(im.height * math.sqrt(area / aspect))))
    left, top = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
    return im.crop((left, top, left + w, top + h)), None


def _flip(im, rng):
    return ImageOps.mirror(im), None


def _rotate(im, rng):
    angle = rng.uniform(5, 15) * rng.choice([-1, 1])
    return im.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0)), None


def _color(im, rng):
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-20, 21))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB"), None


def _grey(im, rng):
    return ImageOps.grayscale(im).convert("RGB"), None


def _blur(im, rng):
    return im.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.005, 0.015) * max(im.size))), None


def _border(im, rng):
    pad = [round(rng.uniform(0.05, 0.2) * s) for s in (im.width, im.height, im.width, im.height)]
    return ImageOps.expand(im, border=tuple(pad), fill=tuple(int(c) for c in rng.integers(0, 256, 3))), None


def _overlay(im, rng):
    """A line of text or a logo-like badge drawn over part of the image."""
    im = im.copy()
    draw = ImageDraw.Draw(im, "RGBA")
    size = max(10, round(min(im.size) * rng.uniform(0.08, 0.16)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    x, y = int(rng.integers(0, max(1, im.width - 4 * size))), int(rng.integers(0, max(1, im.height - size)))
    if rng.random() < 0.5:
        text = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789 "), size=int(rng.integers(6, 14))))
        draw.text((x, y), text, fill=colour + (255,), font=ImageFont.load_default(size=size),
                  stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0, 255))
    else:
        r = size * rng.uniform(1.0, 2.0)
        draw.ellipse((x, y, x + 2 * r, y + 2 * r), fill=colour + (int(rng.integers(160, 256)),))
        draw.rectangle((x + r / 2, y + r / 2, x + 1.5 * r, y + 1.5 * r), fill=(255 - colour[0], 255 - colour[1], 255 - colour[2], 255))
    return im, None


def _combo(im, rng):
    """Two or three other families in a row, then a JPEG of quality 40 to 90."""
    names = [n for n in FAMILIES if n not in ("combo", "jpeg")]
    for name in rng.choice(names, size=int(rng.integers(2, 4)), replace=False):
        im, _ = FAMILIES[name].edit(im, rng)
    return im, int(rng.integers(40, 91))


FAMILIES: dict[str, Family] = {
    "jpeg": Family(_jpeg, "JPEG re-encode at quality 10 to 75"),
    "resize": Family(_resize, "downscaled to 25 to 50 % of each side"),
    "crop": Family(_crop, "a crop keeping 50 to 90 % of the area"),
    "flip": Family(_flip, "mirrored left to right"),
    "rotate": Family(_rotate, "rotated 5 to 15 degrees either way, corners black"),
    "color": Family(_color, "brightness, contrast and saturation × 0.6 to 1.4, hue shifted"),
    "grey": Family(_grey, "greyscale"),
    "blur": Family(_blur, "Gaussian blur of 0.5 to 1.5 % of the longer side"),
    "border": Family(_border, "a border of 5 to 20 % of each side in one colour"),
    "overlay": Family(_overlay, "a line of text or a logo drawn over it"),
    "combo": Family(_combo, "two or three of the above, then JPEG at quality 40 to 90"),
}


def copy_rng(seed: int, image_id: int, family: str) -> np.random.Generator:
    """The generator of one (image, family) copy: the same copy on every run, whatever the order."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{family}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_copy(im: Image.Image, family: str, rng: np.random.Generator) -> bytes:
    """The JPEG bytes of one edited copy of ``im`` (an RGB picture)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown copy family {family!r}; choose from {', '.join(FAMILIES)}")
    edited, quality = FAMILIES[family].edit(im.convert("RGB"), rng)
    buf = io.BytesIO()
    edited.convert("RGB").save(buf, format="JPEG", quality=quality or SAVE_QUALITY)
    return buf.getvalue()
