"""The preprocessing protocol: how a decoded picture becomes a fixed-size tensor (the
:class:`Preprocess` settings and the resize and crop they describe)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from PIL import Image

PATCH_SIZE = 14
MIN_BOX_SIDE = 8  # pixels: a smaller query box holds too little to describe
LIMITS = ("max_pixels", "max_file_bytes", "max_decode_bytes")  # what is refused, not how pixels are made


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes a fixed-size uint8 tensor.

    ``dinov2_eval`` (default): resize the shorter side to ``resize_size`` (bicubic), then
    center-crop ``crop_size`` -- the DINOv2 / ImageNet evaluation protocol.
    ``grid``: resize straight to ``grid_size`` (height, width) without cropping, as in the
    seed article (e.g. 75×50 patches = 1050×700 pixels).
    """

    protocol: str = "dinov2_eval"
    crop_size: int = 224
    resize_size: int = 256
    grid_size: tuple[int, int] = (1050, 700)
    draft: bool = True
    max_pixels: int = 178_956_970  # Pillow's own default limit
    max_file_bytes: int = 256 * 2**20  # a file is read whole into memory
    max_decode_bytes: int = 1 << 30  # decoded frame and its RGB copy, from the header: a larger image is refused

    def __post_init__(self) -> None:
        if self.protocol not in ("dinov2_eval", "grid"):
            raise ValueError(f"unknown preprocessing protocol {self.protocol!r}; use 'dinov2_eval' or 'grid'")
        h, w = self.output_size
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(
                f"output size {h}x{w} is not a multiple of the patch size {PATCH_SIZE}; "
                f"use e.g. {round(h / PATCH_SIZE) * PATCH_SIZE}x{round(w / PATCH_SIZE) * PATCH_SIZE}"
            )
        if self.protocol == "dinov2_eval" and self.resize_size < self.crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")

    @property
    def output_size(self) -> tuple[int, int]:
        if self.protocol == "grid":
            return (int(self.grid_size[0]), int(self.grid_size[1]))
        return (self.crop_size, self.crop_size)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, computed like torchvision's Resize."""
        if self.protocol == "grid":
            return (self.output_size[1], self.output_size[0])
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def describe(self) -> dict:
        """Everything, limits included; :data:`LIMITS` do not change what a vector means."""
        d = asdict(self)
        d["output_size"] = list(self.output_size)
        return d


class BadBox(ValueError):
    """A query box that is malformed, or that leaves too little of the image."""


@dataclass(frozen=True)
class Box:
    """A region of a picture as a person sees it (after EXIF rotation), in pixels: left, top,
    right, bottom, right and bottom excluded. Fractions are kept: the crop is resampled, not
    rounded to whole pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in self.coords):
            raise BadBox(f"box coordinates must be finite numbers, got {self.text}")
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise BadBox(f"box {self.text} needs x0 < x1 and y0 < y1")

    @classmethod
    def parse(cls, text: str) -> "Box":
        """``"x0,y0,x1,y1"`` → a Box; :class:`BadBox` saying what is wrong with it."""
        parts = str(text).split(",")
        if len(parts) != 4:
            raise BadBox(f"box must be four numbers x0,y0,x1,y1 (pixels), got {str(text)[:80]!r}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise BadBox(f"box must be four numbers x0,y0,x1,y1 (pixels), got {str(text)[:80]!r}") from None
        box = cls(*values)
        if box.width < MIN_BOX_SIDE or box.height < MIN_BOX_SIDE:
            raise BadBox(f"box {box.text} is {box.width:g}x{box.height:g} pixels; "
                         f"each side must be at least {MIN_BOX_SIDE}")
        return box

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def text(self) -> str:
        return ",".join(f"{v:g}" for v in self.coords)

    def clip(self, width: int, height: int) -> "Box":
        """The part of this box inside a ``width``×``height`` picture. A box that reaches past
        an edge is cut there (dragged boxes often overshoot); :class:`BadBox` when less than
        :data:`MIN_BOX_SIDE` pixels a side would be left."""
        x0, y0 = min(max(self.x0, 0.0), width), min(max(self.y0, 0.0), height)
        x1, y1 = min(max(self.x1, 0.0), width), min(max(self.y1, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            raise BadBox(f"box {self.text} lies outside the {width}x{height} image")
        if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
            raise BadBox(f"box {self.text} leaves {x1 - x0:g}x{y1 - y0:g} pixels of the "
                         f"{width}x{height} image; each side must be at least {MIN_BOX_SIDE}")
        return Box(x0, y0, x1, y1)

    def scaled(self, sx: float, sy: float) -> "Box":
        """The same region in a copy of the picture resized by ``sx``, ``sy`` (a JPEG draft)."""
        return Box(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy)


def source_box(width: float, height: float, pre: Preprocess, region: Box | None = None
               ) -> tuple[float, float, float, float]:
    """The part of a ``width``×``height`` picture (or of its ``region``) that the resize and
    center crop keep: what the model's patch grid covers, in the picture's pixels."""
    left0, top0 = (region.x0, region.y0) if region is not None else (0.0, 0.0)
    w, h = (region.width, region.height) if region is not None else (width, height)
    out_h, out_w = pre.output_size
    new_w, new_h = pre.resized_size(w, h)
    # Same rounding as torchvision.transforms.functional.center_crop.
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    sx, sy = w / new_w, h / new_h
    return (left0 + left * sx, top0 + top * sy, left0 + (left + out_w) * sx, top0 + (top + out_h) * sy)


def resize_and_crop(im: Image.Image, pre: Preprocess, region: Box | None = None) -> Image.Image:
    """torchvision's ``Resize`` (bicubic, antialiased) then ``CenterCrop``, in one step; of
    ``region`` only when given, as if the picture had been cropped to it first.

    Resampling only the source box that lands in the crop gives the same pixels as resizing
    everything and cropping afterwards (same filter scale and sample centres) for less work.
    """
    out_h, out_w = pre.output_size
    return im.resize((out_w, out_h), Image.BICUBIC, box=source_box(im.width, im.height, pre, region))
