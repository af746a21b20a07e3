"""The preprocessing protocol: how a decoded picture becomes a fixed-size tensor (the
:class:`Preprocess` settings and the resize and crop they describe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image

PATCH_SIZE = 14
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


def resize_and_crop(im: Image.Image, pre: Preprocess) -> Image.Image:
    """torchvision's ``Resize`` (bicubic, antialiased) then ``CenterCrop``, in one step.

    Resampling only the source box that lands in the crop gives the same pixels as resizing
    everything and cropping afterwards (same filter scale and sample centres) for less work.
    """
    out_h, out_w = pre.output_size
    new_w, new_h = pre.resized_size(*im.size)
    # Same rounding as torchvision.transforms.functional.center_crop.
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    sx, sy = im.width / new_w, im.height / new_h
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    return im.resize((out_w, out_h), Image.BICUBIC, box=box)
